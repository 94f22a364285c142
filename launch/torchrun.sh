#!/usr/bin/env bash
# One node, one process per GPU:
#   bash launch/torchrun.sh --config configs/cifar10_cnn.yaml [key.sub=value ...]
# NPROC (default: the number of GPUs nvidia-smi lists, else 1) sets the process count;
# PYTHON (default: .venv/bin/python when present, else python3) the interpreter with fasttrain.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NPROC" -ge 1 ]] || NPROC=1
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m fasttrain.run "$@"
