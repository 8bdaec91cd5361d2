#!/usr/bin/env bash
# Issue 6's comparison at >= 1000 samples, sampled on the lent GPU (the device tool):
#   device run: bash tools/gpu_eval_table.sh [N] [BUILD_DIR ...]      carry: .whl out/builds
# .whl holds the diffusers wheel (the GPU image has torch, not diffusers; see the device README);
# out/builds holds `adatsq build` directories made on the CPU (plan.json + weights.safetensors).
# The analysis the baselines need (trajectory, Fisher, Hessians) is recomputed there on the CPU
# (cached under $ADATSQ_CACHE for the run); every baseline's weights are prepared on the CPU and
# moved to the GPU for sampling (EvalConfig.device). Writes $OUT/table_gpu.{json,md}.
set -euo pipefail
N=${1:-1000}
shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/adatsq
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 ADATSQ_CACHE=/tmp/adatsq-cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
plans=()
for d in "${@:-out/builds/*}"; do
  for b in $d; do [ -f "$b/plan.json" ] && plans+=(--plan "$b"); done
done
methods=()
for m in rtn smoothquant quarot gptq qdit viditq svdquant; do methods+=(--method "$m"); done
python3 -m adatsq eval flux-fmnist -n "$N" --batch 500 --device cuda --keep-going \
  "${methods[@]}" --bits W4A4 --bits W3A3 "${plans[@]}" \
  --json "$OUT/table_gpu.json" --md "$OUT/table_gpu.md" 2>&1 \
  | grep -vE "^W[0-9]{4}|UserWarning|FutureWarning|return cls|warnings.warn" | grep -v "━"
