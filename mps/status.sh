#!/usr/bin/env bash
# Where nvidia-cuda-mps-control is and which MPS daemon runs.
set -euo pipefail
# the package in this repository, installed or not
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m splitwiser mps status "$@"
