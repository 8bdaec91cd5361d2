#!/usr/bin/env bash
# Measure the analysis passes on a Flux-dev-width slice on the lent GPU (the device tool):
#   device run: bash tools/gpu_analysis_fluxdev.sh      carry: .whl
# .whl holds the diffusers wheel (the GPU image has torch, not diffusers; see the device README).
# Writes $OUT/analysis_fluxdev.json and _tok1024.json (commit them under benchmarks/results/).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/adatsq
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# all tokens, then Hessians from 1024 of the 4608 tokens per call
for sub in "" 1024; do
  python3 tools/gpu_analysis_fluxdev.py --double 4 --single 8 --steps 3 ${sub:+--hessian-tokens $sub} \
    --out "$OUT/analysis_fluxdev${sub:+_tok$sub}.json" "$@" 2>&1 | grep -vE "^W[0-9]{4}|UserWarning|FutureWarning|return cls|kept in float32" \
    | grep -E "^[A-Z][A-Za-z]+ \{|^NVIDIA"
done
