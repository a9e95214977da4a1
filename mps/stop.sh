#!/usr/bin/env bash
# Stop the MPS control daemon that 'splitwiser mps start' started; never any other.
set -euo pipefail
# the package in this repository, installed or not
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m splitwiser mps stop "$@"
