#!/usr/bin/env bash
# Stop the MPS control daemon that 'splitwiser mps start' started; never any other.
set -euo pipefail
exec splitwiser mps stop "$@"
