#!/usr/bin/env bash
# Where nvidia-cuda-mps-control is and which MPS daemon runs.
set -euo pipefail
exec splitwiser mps status "$@"
