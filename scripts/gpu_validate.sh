#!/usr/bin/env bash
# One GPU session's checks, in order of importance; each step has its own time limit so a slow
# one cannot eat the others. Run from the repo root on a CUDA machine with torch, triton and
# transformers installed (no network needed): `make wheels-gpu` here first puts hydra-core,
# omegaconf and antlr4 into .whl/, which this script installs into /tmp/site.
#   OUT=/some/dir bash scripts/gpu_validate.sh [tests] [e2e] [bench] [anchor]
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
  # run folders stay in /tmp (the device tool brings back at most 8 files); logs are appended to one file
  for model in tiny_llama tiny_mixtral tiny_hybrid; do
    timeout 180 python3 launch.py model=$model backend=triton transforms/compile=torch-opt prompt=greedy \
      hydra.run.dir="/tmp/runs/$model" > "/tmp/runs_$model.log" 2>&1
    rc=$?
    echo "$model rc=$rc $(grep -c '^\[output\]' "/tmp/runs_$model.log") outputs"
    grep -E '^\[(output|error)' "/tmp/runs_$model.log" | head -2
    [[ $rc == 0 ]] || grep -E "Error" "/tmp/runs_$model.log" | tail -2
    { echo "=== $model"; cat "/tmp/runs_$model.log"; } >> "$OUT/e2e.log"
  done
fi

if [[ " $STEPS " == *" bench "* ]]; then
  echo "=== Llama-3.1-8B shape, random bf16 weights, triton attention, isl 1024 osl 128"
  # BENCH="compile:bs[:hf] ...": the configurations to time (hf = also time HF eager generate)
  for spec in ${BENCH:-torch-cudagraph:1 torch-opt:1:hf torch-cudagraph:32 torch-opt:32}; do
    IFS=: read -r backend bs hf <<<"$spec"
    name="bench_8b_${backend}_bs${bs}"
    timeout 300 python3 launch.py model=llama3_8b backend=triton transforms/compile=$backend benchmark=latency \
      benchmark.bs=$bs benchmark.num=3 benchmark.compare_hf=$([[ $hf == hf ]] && echo true || echo false) \
      args.max_batch_size=$bs "args.cuda_graph_batch_sizes=[$bs]" args.free_mem_ratio=0.3 \
      hydra.run.dir="/tmp/runs/$name" > "/tmp/runs_$name.log" 2>&1
    rc=$?
    echo "$backend bs=$bs rc=$rc"
    [[ $rc == 0 ]] || grep -E "Error" "/tmp/runs_$name.log" | tail -2
    { echo "=== $name"; cat "/tmp/runs_$name.log"; } >> "$OUT/bench.log"
    cp "/tmp/runs/$name/results.json" "$OUT/$name.json" 2>/dev/null
    python3 scripts/summarize_results.py "$OUT/$name.json"
  done
fi

if [[ " $STEPS " == *" anchor "* ]] && [[ -f .anchors/hand_decode.py ]]; then
  echo "=== anchor: hand-written compiled decode loop (../shared/anchors, carried in .anchors/)"
  BS=${ANCHOR_BS:-1,32} timeout 400 python3 .anchors/hand_decode.py 2>&1 | grep RESULT
fi
