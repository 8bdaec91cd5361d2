#!/usr/bin/env bash
# Issue 6 on the device: plans searched on the GPU with many search samples (`adatsq build --device
# cuda`), then sampled at n seeds against the best uniform method. Two stages, so each device call
# stays under its 10 minutes:
#   run: bash tools/gpu_search.sh build SAMPLES     carry: .whl
#        -> $OUT/NAME.weights.safetensors (one per build) and $OUT/builds.tgz (plan, report, plots)
#   run: bash tools/gpu_search.sh eval N NAME        carry: .whl out/gs  (the builds, unpacked)
#        -> $OUT/NAME.json, $OUT/NAME.md, $OUT/NAME.per-sample.safetensors, $OUT/NAME.paired.md (each
#           plan against SVDQuant-like at its budget, sample by sample: tools/paired.py)
# The analysis (trajectory, Fisher, Hessians) is computed on the machine's CPUs (its statistics do
# not fit the carry limit); the search runs on the GPU, the weight copies are made on the CPU.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/adatsq
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 ADATSQ_CACHE=$PWD/out/gpu-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
lscpu | grep -m1 "Model name"
WIDE=W2A2,W2A4,W3A3,W4A2,W4A4,W4A8,W8A8,FP16
quiet() { grep -vE "^W[0-9]{4}|UserWarning|FutureWarning|return cls|warnings.warn|━" || true; }
case "$1" in
  build)
    S=${2:-200}
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_build.py 2>&1 | tail -2
    one() {
      name=$1; shift
      start=$(date +%s)
      python3 -m adatsq build flux-fmnist --target simulate -o "out/gs/$name" --device cuda \
        --search-samples "$S" --sensitivity-samples 32 "$@" 2>&1 | quiet | grep -vE " [0-9]+/[0-9]+$"
      echo "$name: wall $(( $(date +%s) - start )) s"
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['seconds'], r['policy'])" \
        "out/gs/$name/report.json"
      cp "out/gs/$name/weights.safetensors" "$OUT/$name.weights.safetensors"
    }
    one w3a3-wide-s$S --budget W3A3 --lattice $WIDE
    one w4a4-wide-s$S --budget W4A4 --lattice $WIDE
    one w4a4-s$S --budget W4A4
    tar czf "$OUT/builds.tgz" --exclude weights.safetensors -C out/gs . ;;
  eval)
    N=$2; NAME=$3
    plans=(); for d in out/gs/*/; do plans+=(--plan "${d%/}"); done
    start=$(date +%s)
    python3 -m adatsq eval flux-fmnist --device cuda --batch 500 -n "$N" --method svdquant --bits W4A4 --bits W3A3 \
      "${plans[@]}" --json "$OUT/$NAME.json" --md "$OUT/$NAME.md" --per-sample "$OUT/$NAME.per-sample.safetensors" \
      2>&1 | quiet
    echo "wall $(( $(date +%s) - start )) s"
    cat "$OUT/$NAME.md"
    # each plan against the uniform SVDQuant-like variant at its budget, sample by sample
    pairs=(); for d in out/gs/*/; do b=$(basename "$d" | grep -oE "^w[0-9]a[0-9]"); pairs+=(--pair "plan:${d%/}" "$b-svdquant"); done
    python3 -m adatsq.tools.paired "$OUT/$NAME.per-sample.safetensors" "${pairs[@]}" --md "$OUT/$NAME.paired.md" ;;
  *) echo "usage: gpu_search.sh build SAMPLES | eval N NAME"; exit 2 ;;
esac
