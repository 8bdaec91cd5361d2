#!/usr/bin/env bash
# Issue 6 on the device: plans searched on the GPU with many search samples (`adatsq build --device
# cuda`) and plans built on the CPU (carried in out/gs), sampled at n seeds against SVDQuant-like,
# the best uniform method, and compared sample by sample (tools/paired.py).
#   run: bash tools/gpu_search.sh STAGE ...        carry: .whl out/gs
# STAGE, run in order:
#   test                         the GPU tests of the search and of the GPU peers (-m gpu)
#   build:NAME:SAMPLES:SECONDS   `adatsq build --device cuda --search-samples SAMPLES` of a named
#                                configuration (below) into out/gs/NAME-sSAMPLES, given up after SECONDS
#                                -> $OUT/NAME-sSAMPLES.tgz (plan, report, plots, weights: a few MB on
#                                flux-fmnist; untar into out/gs to carry them into a later call)
#   plan:NAME                    `adatsq build --from-plan` of the committed plan benchmarks/results/builds/NAME
#                                (its weights made on the machine's CPUs, with its build's weight options)
#                                into out/gs/NAME (not sent back: $OUT holds at most 8 files)
#   eval:N:SEED:TAG[:GLOB[:none]]  the builds out/gs/GLOB (default all) and SVDQuant-like W4A4 and W3A3
#                                (not with :none) on seeds SEED..SEED+N-1; every plan is paired with
#                                SVDQuant-like at its budget, from this or an earlier eval's samples
#                                -> $OUT/TAG.json, TAG.md, TAG.per-sample.safetensors, TAG.paired.md
#   peers:N:SEED:TAG             the W4A4 peers that need a GPU (modelopt NVFP4, NVFP4 SVDQuant) on the
#                                same seeds (carry their wheels in .whl); every W4A4 build in out/gs and
#                                SVDQuant-like W4A4 are paired with each, from the earlier evals' samples
# The analysis (trajectory, Fisher, Hessians) is computed on the machine's CPUs (its statistics do
# not fit the carry limit); the search runs on the GPU, the weight copies are made on the CPU.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/adatsq
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 ADATSQ_CACHE=$PWD/out/gpu-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" out/gs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
lscpu | grep -m1 "Model name"
WIDE=W2A2,W2A4,W3A3,W4A2,W4A4,W4A8,W8A8,FP16
WIDE_NV=W2A2,W2A4,W3A3,W4A2,W4A4,NVFP4,W4A8,W8A8,FP16
quiet() { grep -vE "^W[0-9]{4}|UserWarning|FutureWarning|return cls|warnings.warn|━| [0-9]+/[0-9]+$" || true; }
flags() {
  case "$1" in
    w3a3-wide) echo "--budget W3A3 --lattice $WIDE" ;;
    w4a4-wide) echo "--budget W4A4 --lattice $WIDE" ;;
    w4a4) echo "--budget W4A4" ;;
    w45-nvfp4) echo "--budget W4.5A4.5 --lattice $WIDE_NV" ;;     # NVFP4's bits, NVFP4 in the lattice
    nvfp4-uniform) echo "--budget W4.5A4.5 --lattice NVFP4,FP16" ;; # uniform NVFP4 on our base (no search)
    *) echo "unknown configuration $1" >&2; return 1 ;;
  esac
}
budget_of() {  # a build directory's budget as a variant suffix: w4a4, w3a3 ...
  python3 -c "import json,sys; b=json.load(open(sys.argv[1]))['budget']; print(f\"w{b['w_bits']:g}a{b['a_bits']:g}\")" "$1/report.json"
}
t0=$(date +%s)
for stage in "$@"; do
  echo "== $stage (at $(( $(date +%s) - t0 )) s)"
  IFS=: read -r kind a b c d e <<< "$stage"
  case "$kind" in
    test) python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_build.py tests/test_peers.py 2>&1 | tail -4 ;;
    build)
      f=$(flags "$a") || continue
      name=$a-s$b
      timeout "$c" python3 -m adatsq build flux-fmnist --target simulate -o "out/gs/$name" --device cuda \
        --search-samples "$b" --sensitivity-samples 32 $f 2>&1 | quiet
      if [ -f "out/gs/$name/report.json" ]; then
        python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['seconds'], r['search'], r['policy'])" \
          "out/gs/$name/report.json" | cut -c1-600
        tar czf "$OUT/$name.tgz" -C out/gs "$name"
      else
        echo "$name: not built within $c s"; rm -rf "out/gs/$name"
      fi ;;
    plan)
      src=benchmarks/results/builds/$a
      wopts=$(python3 -c "import json,sys; o=json.load(open(sys.argv[1]))['options']; print(' '.join(f'--{k.replace(\"_\", \"-\")} {o[k]}' for k in ('target', 'weights', 'base', 'rank', 'group_size', 'fisher_mix')))" "$src/report.json") || continue
      python3 -m adatsq build flux-fmnist --from-plan "$src/plan.json" -o "out/gs/$a" $wopts 2>&1 | quiet | tail -4 ;;
    eval)
      plans=(); pairs=()
      for p in out/gs/${d:-*}/; do
        [ -f "$p/weights.safetensors" ] || continue
        bits=$(budget_of "$p")
        plans+=(--plan "${p%/}"); pairs+=(--pair "plan:${p%/}" "$bits-svdquant")
      done
      base=(--method svdquant --bits W4A4 --bits W3A3); [ "$e" = none ] && base=()
      python3 -m adatsq eval flux-fmnist --device cuda --batch 500 -n "$a" --seed "$b" "${base[@]}" "${plans[@]}" \
        --json "$OUT/$c.json" --md "$OUT/$c.md" --per-sample "$OUT/$c.per-sample.safetensors" 2>&1 | quiet
      cat "$OUT/$c.md"
      python3 -m adatsq.tools.paired "$OUT"/*.per-sample.safetensors "${pairs[@]}" --md "$OUT/$c.paired.md" ;;
    peers)
      python3 -m adatsq eval flux-fmnist --device cuda --batch 500 -n "$a" --seed "$b" --keep-going \
        --variant modelopt-nvfp4 --variant modelopt-nvfp4-svdquant \
        --json "$OUT/$c.json" --md "$OUT/$c.md" --per-sample "$OUT/$c.per-sample.safetensors" 2>&1 | quiet
      cat "$OUT/$c.md"
      pairs=()
      for p in out/gs/*/; do
        [ -f "$p/weights.safetensors" ] || continue
        bits=$(budget_of "$p")
        [ "$bits" = w4a4 ] || continue
        for peer in modelopt-nvfp4 modelopt-nvfp4-svdquant; do pairs+=(--pair "plan:${p%/}" "$peer"); done
      done
      for peer in modelopt-nvfp4 modelopt-nvfp4-svdquant; do pairs+=(--pair w4a4-svdquant "$peer"); done
      python3 -m adatsq.tools.paired "$OUT"/*.per-sample.safetensors "${pairs[@]}" --md "$OUT/$c.paired.md" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "== done at $(( $(date +%s) - t0 )) s"
