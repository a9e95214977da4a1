#!/usr/bin/env bash
# The GPU validation suite, for a machine with one NVIDIA GPU. Name the stages to run; every
# stage runs under `timeout` (its limit below; Ctrl-C to its whole process group, SIGKILL 15 s
# later), so a stage stuck in CUDA or MPS start-up cannot eat the slot. The essential evidence
# in three commands of under 10 minutes each (bench/README.md gives the times):
#
#   bash bench/gpu_suite.sh env handoff bandwidth memory --archive DIR
#   bash bench/gpu_suite.sh tests --archive DIR
#   bash bench/gpu_suite.sh bench-nomps bench-mps --archive DIR
#   bash bench/gpu_suite.sh profile-nomps --archive DIR        (optional, one more command)
#
# Stages: env tests handoff bandwidth memory bench-nomps bench-mps profile-nomps profile-mps
# (see bench/gpu_suite.py). --archive DIR: everything this command wrote, logs included, as
# one DIR/<run>-<time>-<stages>.tar.gz. Other arguments (--model M, ...) go to every stage.
# $GPU_SUITE_LIMIT_S replaces every stage's limit (seconds).
# Results land in results/gpu/<date>-<device>/ (or $GPU_SUITE_OUT), one log per stage.
# No install needed: the repository is put on PYTHONPATH.
set -uo pipefail
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
cd "$(dirname "$0")/.."
declare -A limit_s=(
    [env]=120 [handoff]=180 [bandwidth]=300 [memory]=240 [tests]=540
    [bench-nomps]=280 [bench-mps]=280 [profile-nomps]=540 [profile-mps]=540
)
stages=() options=() archive=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --archive) [ $# -ge 2 ] || { echo "gpu_suite.sh: --archive needs a folder" >&2; exit 2; }
                   archive=$2; shift ;;
        --archive=*) archive=${1#--archive=} ;;
        all) stages+=(env handoff bandwidth memory tests bench-nomps bench-mps) ;;
        *) if [ -n "${limit_s[$1]+x}" ]; then stages+=("$1"); else options+=("$1"); fi ;;
    esac
    shift
done
if [ ${#stages[@]} -eq 0 ]; then
    usage >&2
    echo "gpu_suite.sh: name the stages to run" >&2
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
status=0
for stage in "${stages[@]}"; do
    limit=${GPU_SUITE_LIMIT_S:-${limit_s[$stage]}}
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
done
echo "results: $out"
if [ -n "$archive" ]; then
    name="$(basename "$out")-$(date +%H%M%S)-$(IFS=+; echo "${stages[*]}").tar.gz"
    (cd "$(dirname "$out")" && find "$(basename "$out")" -type f -newer "$started" -print0 \
        | tar czf - --null -T -) > "$archive/$name" || status=1
    echo "archive: $archive/$name"
fi
rm -f "$started"
exit $status
