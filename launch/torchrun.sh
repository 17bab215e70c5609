#!/usr/bin/env bash
# Launch megafusion on one node with torchrun.
#   NPROC=4 launch/torchrun.sh --config examples/configs/tiny_dense.yaml parallel.tp=2 parallel.pp=2
# NPROC defaults to the number of GPUs (or 2 processes on a CPU-only machine).
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=2
  fi
fi
exec torchrun --standalone --nproc-per-node "$NPROC" -m megafusion.train "$@"
