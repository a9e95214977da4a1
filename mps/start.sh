#!/usr/bin/env bash
# Start a private CUDA MPS control daemon (or report the one already running).
set -euo pipefail
exec splitwiser mps start "$@"
