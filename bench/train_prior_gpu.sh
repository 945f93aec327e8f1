#!/usr/bin/env bash
# Train the built-in prior on one GPU in under 10 minutes (prepared for issue 16; NOT yet run:
# no GPU was lent to the session that wrote it). Resumable: rerun the same line after a stop and it
# continues from $OUT/state.pt. Data: bench/prior_data.py (scikit-image + Debian wallpaper photos,
# every file's package and licence in $DATA/manifest.json, which the card should cite).
#
#   bench/train_prior_gpu.sh [DATA_DIR] [OUT_DIR]
#
# Sizing (an estimate, to be replaced by the measured wall time in the card): the shipped prior
# took 1900 s for 3600 steps of batch 16 at 64 px on one CPU thread; a 4x wider UNet (ch 64,
# ch_mult 1,2,2,2, two res blocks, ~9 M parameters, < 20 MB in fp16) at batch 64 is a few ms a
# step on an H200 in bf16, so 40000 steps fit in about 8 minutes; --time-limit 9 stops it in time
# and saves the state, so a second sitting resumes instead of starting over.
set -euo pipefail
DATA=${1:-/tmp/prior-data}
OUT=${2:-/tmp/prior-gpu}
mkdir -p "$OUT"
if [ ! -f "$DATA/manifest.json" ]; then
  python bench/prior_data.py -o "$DATA"
fi
python -m deqir_dist train-prior -o "$OUT/builtin.safetensors" --log "$OUT/loss.csv" \
  --data "$DATA" --state "$OUT/state.pt" --state-every 2000 \
  --device cuda --amp bf16 --steps 40000 --batch 64 --crops 32,64 --lr 0.0005 --warmup 1000 --ema 0.9995 \
  --ch 64 --ch-mult 1,2,2,2 --res-blocks 2 --store-dtype float16 --seed 0 --val-every 4000 --val-crops 16 \
  --time-limit 9
python bench/defaults_quality.py --json "$OUT/defaults-quality.json" --threads 8
