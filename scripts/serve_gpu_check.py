"""Serving overhead on one GPU: the offline benchmark and the OpenAI server, on one engine, in one run.

    PYTHONUNBUFFERED=1 python3 scripts/serve_gpu_check.py --out DIR [--model llama3_8b] [--num 3]
        [--isl 1024] [--osl 128] [--set key=value ...]

One build (the 8B shape, random bf16 weights, triton attention, torch-opt with CUDA graphs for
batches 1 and 32), then on that engine:
1. the offline benchmark (bench/benchmark.py) at batch 1 and 32: ``warmup`` + ``num`` rounds;
2. the server (port 0, loopback) with the serving benchmark's client in a process of its own
   (bench/serve_client.py): concurrency 1 (``8 * num`` requests) and 32 (``32 * num`` requests, all
   at once, at most 32 in flight), random prompts of ``isl`` tokens, exactly ``osl`` tokens each.
Prints the table of issue 23's targets (TPOT and TTFT at c=1 against batch 1; output tok/s at c=32
against batch 32) and writes every figure to DIR/serve_check.json. On a machine without CUDA it
runs the tiny Llama on the CPU (``--model tiny_llama``): a check of the script, not of the targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf


def offline(engine, bs: int, args) -> dict:
    from autodeploy.bench.benchmark import run_batch_size

    cfg = SimpleNamespace(isl=args.isl, osl=args.osl, num=args.num, warmup=2)
    r = run_batch_size(engine, cfg, bs)
    return {"ttft_ms_p50": r["ttft_ms"]["p50"], "tpot_ms_p50": r["tpot_ms"]["p50"], "itl_ms_p50": r["itl_ms"]["p50"],
            "output_tok_s": r["output_tok_s"], "decode_tok_s": r["decode_tok_s"]}


def served(url: str, engine, concurrency: int, num_prompts: int, args) -> dict:
    from autodeploy.bench.serve import random_requests, run_client, summarize, table

    bench = SimpleNamespace(isl=args.isl, osl=args.osl, request_rate=float("inf"), max_concurrency=concurrency,
                            warmup=2, seed=concurrency, dataset=None)
    requests = random_requests(num_prompts, args.isl, args.osl, engine.vocab_size, seed=concurrency)
    result = summarize(run_client(url, bench, requests), bench, url)
    print(table(result), flush=True)
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} requests failed: {result['errors']}")
    return {"ttft_ms_p50": result["ttft_ms"]["p50"], "tpot_ms_p50": result["tpot_ms"]["p50"],
            "itl_ms_p50": result["itl_ms"]["p50"], "output_tok_s": result["output_tok_s"],
            "num_prompts": num_prompts, "duration_s": result["duration_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="llama3_8b" if torch.cuda.is_available() else "tiny_llama")
    parser.add_argument("--num", type=int, default=3)
    parser.add_argument("--isl", type=int, default=1024 if torch.cuda.is_available() else 64)
    parser.add_argument("--osl", type=int, default=128 if torch.cuda.is_available() else 16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="LLM keyword overrides, dotted")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from autodeploy import LLM
    from autodeploy.serve.server import Server

    gpu = dict(attn_backend="triton", compile_backend="torch-opt", cuda_graph_batch_sizes=[1, 32], free_mem_ratio=0.3)
    cpu = dict(device="cpu", compile_backend="torch-simple", attn_page_size=16)
    kwargs = {**(gpu if torch.cuda.is_available() else cpu), "max_seq_len": args.isl + args.osl,
              **OmegaConf.to_container(OmegaConf.from_dotlist(args.set))}
    t0 = time.perf_counter()
    llm = LLM(args.model, max_batch_size=32, **kwargs)
    engine = llm.engine
    record = {"model": args.model, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "kwargs": kwargs, "isl": args.isl, "osl": args.osl, "build_s": time.perf_counter() - t0,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record["offline_bs1"] = offline(engine, 1, args)
    record["offline_bs32"] = offline(engine, 32, args)

    def client(url: str) -> dict:
        return {"c1": served(url, engine, 1, 8 * args.num, args), "c32": served(url, engine, 32, 32 * args.num, args)}

    record.update(Server(engine, args.model, port=0, shutdown_grace_s=5).run(client))
    llm.shutdown()
    (args.out / "serve_check.json").write_text(json.dumps(record, indent=2))

    o1, o32, s1, s32 = record["offline_bs1"], record["offline_bs32"], record["c1"], record["c32"]
    rows = [
        ("TPOT p50 (ms), c=1 vs bs 1", o1["tpot_ms_p50"], s1["tpot_ms_p50"], s1["tpot_ms_p50"] / o1["tpot_ms_p50"],
         "server/offline <= 1.05"),
        ("TTFT p50 (ms), c=1 vs bs 1", o1["ttft_ms_p50"], s1["ttft_ms_p50"], s1["ttft_ms_p50"] - o1["ttft_ms_p50"],
         "server - offline <= 2 ms"),
        ("output tok/s, c=32 vs bs 32", o32["output_tok_s"], s32["output_tok_s"],
         s32["output_tok_s"] / o32["output_tok_s"], "server/offline >= 0.90"),
    ]
    passed = [rows[0][3] <= 1.05, rows[1][3] <= 2.0, rows[2][3] >= 0.90]
    print(f"\n==== serving vs offline: {args.model} on {record['device']}, isl {args.isl}, osl {args.osl}")
    print(f"{'figure':<30}{'offline':>10}{'server':>10}{'ratio/diff':>12}  target")
    for (name, off, srv, ratio, target), ok in zip(rows, passed):
        print(f"{name:<30}{off:>10.2f}{srv:>10.2f}{ratio:>12.3f}  {target} {'PASS' if ok else 'MISS'}")
    print(f"RESULT serve_check tpot_ratio={rows[0][3]:.3f} ttft_diff_ms={rows[1][3]:.2f} "
          f"tok_s_ratio={rows[2][3]:.3f} c1_itl_p50_ms={s1['itl_ms_p50']:.2f} bs1_itl_p50_ms={o1['itl_ms_p50']:.2f}")


if __name__ == "__main__":
    main()
