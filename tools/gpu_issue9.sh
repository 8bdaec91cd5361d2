#!/usr/bin/env bash
# Issue 9 on the device (H100): GPU kernel/runtime tests, then the end-to-end Flux-dev-width benchmark.
#   run: bash tools/gpu_issue9.sh STAGE   (carry .whl: diffusers, importlib_metadata, zipp, torchao wheels)
# STAGE: tests | kernels (GEMM shapes + batch-1 adaLN) | e2e (4+8 blocks: bf16, fp8, mixed, mixed-fp8; profiled) | full (19+38: bf16, mixed) | peer (torchao FP8, 4+8)
#        | attn (FP8 attention: its GPU tests, then the kernel row vs BF16 SDPA at B=1 H=24 N=4608 D=128; ~4 min)
#        | e2e-attn (4+8 blocks: bf16, mixed-fp8, mixed-fp8-attn, fp8-attn; profiled; ~4 min)
#        | quality BUILD (flux-fmnist: the torch runtime on cuda vs the plan's reference ops, n=1000)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/adatsq
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
for stage in "$@"; do
  case "$stage" in
    tests) python3 tools/gpu_diag_kernels.py 2>&1 | tee "$OUT/gpu_diag.txt"
           python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
           python3 -m pytest -q -p no:cacheprovider tests/test_torch_runtime.py -k "lower_linears" 2>&1 | tail -5 ;;
    kernels) python3 benchmarks/gpu_kernels.py --shapes "flux;adaln" --json "$OUT/gpu_kernels.json" 2>&1 | tail -12 ;;
    e2e)   python3 benchmarks/gpu_e2e.py --double 4 --single 8 --variants bf16,fp8,mixed,mixed-fp8 --profile --json "$OUT/e2e_4x8.json" ;;
    attn)  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fp8_attention.py 2>&1 | tail -40 | tee "$OUT/gpu_attn_tests.log"
           python3 benchmarks/gpu_kernels.py --shapes attn --json "$OUT/gpu_attn.json" 2>&1 | tail -6 ;;
    e2e-attn) python3 benchmarks/gpu_e2e.py --double 4 --single 8 --variants bf16,mixed-fp8,mixed-fp8-attn,fp8-attn --profile \
             --json "$OUT/e2e_attn_4x8.json" ;;
    full)  python3 benchmarks/gpu_e2e.py --double 4 --single 8 --variants bf16 --full bf16,mixed --timeout 540 \
             --json "$OUT/e2e_full.json" ;;
    peer)  python3 benchmarks/gpu_e2e.py --double 4 --single 8 --variants bf16,torchao-fp8 --timeout 480 \
             --json "$OUT/e2e_peer.json" ;;
    quality:*) b=${stage#quality:}
           python3 -m adatsq eval flux-fmnist -n 1000 --device cuda --batch 250 --plan "$b" --torch-runtime "$b" \
             --json "$OUT/quality_torch_runtime.json" --md "$OUT/quality_torch_runtime.md" 2>&1 | tail -15 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
