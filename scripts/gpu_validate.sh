#!/usr/bin/env bash
# One GPU session's checks, in order of importance; each step has its own time limit so a slow
# one cannot eat the others. Run from the repo root on a CUDA machine with torch, triton and
# transformers installed (no network needed): `make wheels-gpu` here first puts hydra-core,
# omegaconf and antlr4 into .whl/, which this script installs into /tmp/site.
#   OUT=/some/dir bash scripts/gpu_validate.sh [tests] [e2e] [bench]
set -uo pipefail
OUT=${OUT:-/tmp/gpu_validate}
mkdir -p "$OUT"
STEPS=${*:-tests e2e bench}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AUTODEPLOY_CACHE=${AUTODEPLOY_CACHE:-/tmp/adcache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
git rev-parse --short HEAD 2>/dev/null || true

if [[ " $STEPS " == *" tests "* ]]; then
  echo "=== gpu tests"
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu tests/runtime/test_gpu_runtime.py \
    2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
fi

if [[ " $STEPS " == *" e2e "* ]]; then
  echo "=== launch.py on the GPU: tiny models, triton attention, torch-opt"
  for model in tiny_llama tiny_mixtral tiny_hybrid; do
    timeout 180 python3 launch.py model=$model backend=triton transforms/compile=torch-opt prompt=greedy \
      hydra.run.dir="$OUT/run_$model" > "$OUT/run_$model.log" 2>&1
    echo "$model rc=$? $(grep -c '^\[output\]' "$OUT/run_$model.log") outputs"
    grep -E '^\[(output|error)' "$OUT/run_$model.log" | head -2
  done
fi

if [[ " $STEPS " == *" bench "* ]]; then
  echo "=== Llama-3.1-8B shape, random bf16 weights, isl 1024 osl 128"
  for backend in torch-cudagraph torch-opt; do
    timeout 240 python3 launch.py model=llama3_8b backend=triton transforms/compile=$backend benchmark=latency \
      benchmark.num=3 args.max_batch_size=1 args.cuda_graph_batch_sizes=[1] \
      hydra.run.dir="$OUT/bench_8b_$backend" > "$OUT/bench_8b_$backend.log" 2>&1
    echo "$backend rc=$?"
    python3 - "$OUT/bench_8b_$backend/results.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError as e:
    print("no results:", e); sys.exit()
b = r["benchmark"]
print(f"  build {r['build_s']:.1f}s  out {b['output_tok_s']:.1f} tok/s  TTFT p50 {b['ttft_ms']['p50']:.1f} ms"
      f"  TPOT p50 {b['tpot_ms']['p50']:.2f} ms  ({r['env']['device']})")
EOF
  done
fi
