"""Tensor parallel on the GPU machine: greedy tokens and decode speed of TP=N against TP=1.

    python3 scripts/tp_check.py --tp 1 --out DIR      # one GPU
    python3 scripts/tp_check.py --tp 2 --out DIR      # two GPUs (rank 1 is spawned)

Llama-3.1-8B shape (random bf16 weights), triton attention, torch-opt, CUDA graphs for batch 1 and
32. Writes ``DIR/tp<N>.json``: the greedy tokens of a fixed set of token-id prompts (compare the two
files: same tokens), the build time, and the benchmark at batch 1 and 32 (isl 1024, osl 128).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="llama3_8b")
    parser.add_argument("--num", type=int, default=3)
    parser.add_argument("--nccl", action="store_true", help="all-reduces on NCCL only (no one-shot)")
    args = parser.parse_args()

    from autodeploy import LLM, SamplingParams
    from autodeploy.bench.benchmark import run_benchmark

    extra = {"transforms": {"sharding_transform_executor": {"allreduce_strategy": "nccl"}}} if args.nccl else {}
    t0 = time.perf_counter()
    llm = LLM(args.model, world_size=args.tp, attn_backend="triton", compile_backend="torch-opt", max_batch_size=32,
              cuda_graph_batch_sizes=[1, 32], free_mem_ratio=0.3, **extra)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, llm.engine.vocab_size, (8, 64), generator=gen).tolist()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    bench = OmegaConf.create({"enabled": True, "bs": 1, "batch_sizes": [32], "isl": 1024, "osl": 128, "num": args.num,
                              "warmup": 2, "compare_hf": False})
    result = run_benchmark(llm.engine, bench, factory=llm.factory)
    record = {
        "tp": args.tp, "nccl_only": args.nccl, "build_s": build_s, "tokens": [o.token_ids for o in outs],
        "errors": [o.error for o in outs if o.error],
        "sharding_summary": llm.sharding_plan.summary() if llm.sharding_plan is not None else None,
        "build_stage_s": {r["name"]: r["time_s"] for r in llm.build_report},
        "benchmark": {bs: {k: v for k, v in r.items() if k != "itl_trace"} for bs, r in result["by_batch_size"].items()},
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }
    llm.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"tp{args.tp}{'_nccl' if args.nccl else ''}.json"
    (args.out / name).write_text(json.dumps(record, indent=1, default=str))
    for bs, r in record["benchmark"].items():
        roof = r.get("roofline") or {}
        print(f"RESULT tp={args.tp}{' nccl' if args.nccl else ''} bs={bs} decode_tok_s={r.get('decode_tok_s', 0):.1f} "
              f"tpot_ms={r['tpot_ms']['p50']:.2f} ttft_ms={r['ttft_ms']['p50']:.1f} "
              f"output_tok_s={r['output_tok_s']:.1f} roofline={roof.get('decode_fraction')} build_s={build_s:.0f}",
              flush=True)


if __name__ == "__main__":
    main()
