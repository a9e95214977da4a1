#!/usr/bin/env bash
# The GPU validation suite in one command, for a machine with one NVIDIA GPU:
#
#   bash bench/gpu_suite.sh                 # every stage, one after another
#   bash bench/gpu_suite.sh handoff memory  # some stages (each finishes within 10 minutes)
#
# Stages: env tests handoff bandwidth memory bench-nomps bench-mps profile-nomps profile-mps
# (see bench/gpu_suite.py).
# Everything lands in results/gpu/<date>-<device>/ (or $GPU_SUITE_OUT), with one log per stage.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/NVIDIA //; s/ /-/g')
out=${GPU_SUITE_OUT:-results/gpu/$(date +%Y%m%d)-${device:-cpu}}
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests handoff bandwidth memory bench-nomps bench-mps \
    profile-nomps profile-mps)
status=0
for stage in "${stages[@]}"; do
    echo "== $stage"
    python3 bench/gpu_suite.py "$stage" --out "$out" 2>&1 | tee "$out/$stage.log" || status=1
done
echo "results: $out"
exit $status
