#!/usr/bin/env bash
# The GPU validation suite, for a machine with one NVIDIA GPU. Name the stages to run; each
# finishes within 10 minutes, and so do these groups, one command each:
#
#   bash bench/gpu_suite.sh env handoff bandwidth memory
#   bash bench/gpu_suite.sh tests
#   bash bench/gpu_suite.sh bench-nomps
#   bash bench/gpu_suite.sh bench-mps
#   bash bench/gpu_suite.sh profile-nomps
#   bash bench/gpu_suite.sh profile-mps
#
# Stages: env tests handoff bandwidth memory bench-nomps bench-mps profile-nomps profile-mps
# (see bench/gpu_suite.py). Other arguments (--model M, ...) go to every stage.
# Everything lands in results/gpu/<date>-<device>/ (or $GPU_SUITE_OUT), with one log per stage.
# No install needed: the repository is put on PYTHONPATH.
set -uo pipefail
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
cd "$(dirname "$0")/.."
stages=() options=()
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        env|tests|handoff|bandwidth|memory|bench-nomps|bench-mps|profile-nomps|profile-mps|all)
            stages+=("$arg") ;;
        *) options+=("$arg") ;;
    esac
done
if [ ${#stages[@]} -eq 0 ]; then
    usage >&2
    echo "gpu_suite.sh: name the stages to run" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/NVIDIA //; s/ /-/g')
out=${GPU_SUITE_OUT:-results/gpu/$(date +%Y%m%d)-${device:-cpu}}
mkdir -p "$out"
status=0
for stage in "${stages[@]}"; do
    echo "== $stage"
    python3 bench/gpu_suite.py "$stage" --out "$out" ${options[@]+"${options[@]}"} 2>&1 \
        | tee "$out/$stage.log" || status=1
done
echo "results: $out"
exit $status
