#!/usr/bin/env bash
# Train the shipped flux-fmnist on the lent GPU (the device tool), exactly as it was trained:
#   device run: bash tools/gpu_train_flux_fmnist.sh      carry: .data .whl
# .data/fashion-mnist holds Debian's idx.gz files (cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/);
# .whl holds the diffusers wheel (the GPU image has torch, not diffusers; see the device README).
# Writes $OUT/flux-fmnist (the EMA checkpoint folder) and $OUT/train.log. About 8.5 min on an H100
# (15k steps at 30-37 it/s; torch.compile barely helps a 4 M-parameter model: launch-bound).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 tools/train_flux_fmnist.py --steps 15000 --compile --precision bf16 --save-every 3000 \
  --data .data/fashion-mnist --out "$OUT/flux-fmnist" 2>&1 | tee "$OUT/train.log" | grep -vE "^W[0-9]{4}|UserWarning"
