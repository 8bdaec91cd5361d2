#!/usr/bin/env bash
# `adatsq eval` with sampling on the lent GPU (the device tool), for evaluations at >= 1000 samples:
#   device run: bash tools/gpu_eval.sh NAME [eval arguments ...]      carry: .whl out/builds
# e.g.  bash tools/gpu_eval.sh baselines -n 1000 --method rtn --method svdquant --bits W4A4 --bits W3A3
#       bash tools/gpu_eval.sh plans -n 1000 --plan out/builds/w4a4 --plan out/builds/w3a3
# .whl holds the diffusers wheel (the GPU image has torch, not diffusers; see the device README);
# out/builds holds `adatsq build` directories made on the CPU (plan.json + weights.safetensors).
# The analysis the baselines need (trajectory, Fisher, Hessians) is computed there on the CPU and
# cached in out/gpu-cache (kept between calls while the machine stays warm); every variant's
# weights are prepared on the CPU and moved to the GPU for sampling (EvalConfig.device).
# Writes $OUT/NAME.json and $OUT/NAME.md (merge several with tools/search_table.py).
set -euo pipefail
NAME=$1
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/adatsq
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 ADATSQ_CACHE=$PWD/out/gpu-cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
start=$(date +%s)
python3 -m adatsq eval flux-fmnist --device cuda --batch 500 --keep-going "$@" \
  --json "$OUT/$NAME.json" --md "$OUT/$NAME.md" 2>&1 \
  | grep -vE "^W[0-9]{4}|UserWarning|FutureWarning|return cls|warnings.warn|━" || true
echo "wall $(( $(date +%s) - start )) s"
cat "$OUT/$NAME.md"
