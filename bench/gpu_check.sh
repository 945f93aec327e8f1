#!/usr/bin/env bash
# The one GPU check (device machine: torch + CUDA already installed, no internet).
# Usage on the device: bash bench/gpu_check.sh   (writes $OUT/gpu_check.json; about 3-4 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout 290 python bench/gpu_check.py --out "${OUT:-.}/gpu_check.json"
