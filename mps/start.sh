#!/usr/bin/env bash
# Start a private CUDA MPS control daemon (or report the one already running).
set -euo pipefail
# the package in this repository, installed or not
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m splitwiser mps start "$@"
