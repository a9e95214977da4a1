#!/usr/bin/env bash
# The GPU validation suite, for a machine with one NVIDIA GPU. Name the stages to run; every
# stage runs under `timeout` (its limit below; Ctrl-C to its whole process group, SIGKILL 15 s
# later), so a stage stuck in CUDA or MPS start-up cannot eat the slot. The evidence in two
# commands of at most 8 minutes each (bench/README.md gives the times):
#
#   timeout -k 15 480 bash bench/gpu_suite.sh plan1 --budget-s 465 --archive DIR
#   timeout -k 15 480 bash bench/gpu_suite.sh plan2 --budget-s 465 --archive DIR
#
# plan1: env tests prefill bandwidth; plan2: bench-nomps bench-mps sweep. Other stages:
# handoff memory spike prefix profile-nomps profile-mps (see bench/gpu_suite.py); all: the plans.
# --archive DIR: everything this command wrote, logs included, as one
# DIR/<run>-<time>-<stages>.tar.gz, written again after every stage (a command stopped at its
# limit still leaves its finished stages). --budget-s S: the command's own time; each stage's
# limit is cut to what is left (less 30 s: its kill grace and the archive), a stage with
# under 30 s left is skipped.
# Other arguments (--model M, --device cpu --small, ...) go to every stage.
# $GPU_SUITE_LIMIT_S replaces every stage's limit (seconds).
# Results land in results/gpu/<date>-<device>/ (or $GPU_SUITE_OUT), one log per stage.
# No install needed: the repository is put on PYTHONPATH.
set -uo pipefail
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
cd "$(dirname "$0")/.."
declare -A limit_s=(
    [env]=60 [tests]=270 [prefill]=130 [bandwidth]=110
    [bench-nomps]=130 [bench-mps]=90 [sweep]=300
    [handoff]=180 [memory]=240 [spike]=120 [prefix]=150 [profile-nomps]=540 [profile-mps]=540
)
plan1=(env tests prefill bandwidth)
plan2=(bench-nomps bench-mps sweep)
stages=() options=() archive="" budget=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --archive) [ $# -ge 2 ] || { echo "gpu_suite.sh: --archive needs a folder" >&2; exit 2; }
                   archive=$2; shift ;;
        --archive=*) archive=${1#--archive=} ;;
        --budget-s) [ $# -ge 2 ] || { echo "gpu_suite.sh: --budget-s needs seconds" >&2; exit 2; }
                    budget=$2; shift ;;
        plan1) stages+=("${plan1[@]}") ;;
        plan2) stages+=("${plan2[@]}") ;;
        all) stages+=("${plan1[@]}" "${plan2[@]}") ;;
        *) if [ -n "${limit_s[$1]+x}" ]; then stages+=("$1"); else options+=("$1"); fi ;;
    esac
    shift
done
if [ ${#stages[@]} -eq 0 ]; then
    usage >&2
    echo "gpu_suite.sh: name the stages to run" >&2
    exit 2
fi
if [ -n "$budget" ] && ! [[ "$budget" =~ ^[0-9]+$ ]]; then
    echo "gpu_suite.sh: --budget-s takes whole seconds, got $budget" >&2
    exit 2
fi
if [ -n "$archive" ] && ! { mkdir -p "$archive" && [ -w "$archive" ]; }; then
    echo "gpu_suite.sh: cannot write the archive into $archive" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/NVIDIA //; s/ /-/g')
out=${GPU_SUITE_OUT:-results/gpu/$(date +%Y%m%d)-${device:-cpu}}
mkdir -p "$out"
started=$(mktemp)  # files newer than this one are what this command wrote
name="$(basename "$out")-$(date +%H%M%S)-$(IFS=+; echo "${stages[*]}").tar.gz"
pack() {  # everything written so far, replacing the last archive in one rename
    [ -n "$archive" ] || return 0
    (cd "$(dirname "$out")" && find "$(basename "$out")" -type f -newer "$started" -print0 \
        | tar czf - --null -T -) > "$archive/.$name.part" \
        && mv -f "$archive/.$name.part" "$archive/$name" && echo "archive: $archive/$name"
}
begin=$SECONDS
status=0
for stage in "${stages[@]}"; do
    limit=${GPU_SUITE_LIMIT_S:-${limit_s[$stage]}}
    if [ -n "$budget" ]; then
        left=$((budget - (SECONDS - begin) - 30))
        if [ "$left" -lt 30 ]; then
            echo "[gpu_suite.sh: $stage skipped: ${left} s of the ${budget} s budget left]" \
                | tee "$out/$stage.log"
            status=1
            pack || status=1
            continue
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "== $stage (limit $limit s)"
    # the stage runs its own children 30 s inside this limit, so their logs are complete
    timeout --signal=INT -k 15 "$limit" \
        python3 bench/gpu_suite.py "$stage" --out "$out" --limit-s "$limit" \
        ${options[@]+"${options[@]}"} 2>&1 | tee "$out/$stage.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "[gpu_suite.sh: $stage stopped after $limit s]" | tee -a "$out/$stage.log"
    fi
    [ "$rc" -eq 0 ] || { status=1; echo "== $stage failed (exit $rc)"; }
    pack || status=1
done
echo "results: $out"
rm -f "$started"
exit $status
