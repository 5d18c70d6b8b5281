"""Where a step's time goes on the GPU, and what the engine-level switches change, in one process.

    python3 scripts/perf_probe.py --out DIR [--model llama3_8b] [--num 3] [--no-profile]

One build of the model (triton attention, torch-opt, CUDA graphs for decode batches 1 and 32, the
default pipeline), then:
1. the first request's prefill, timed alone (it includes any compile torch.compile defers to it);
2. the benchmark (isl 1024, osl 128) at batch 1 and 32 with the overlap scheduler off, then on;
3. with --profile (default on): torch.profiler kernel tables of a 1024-token prefill, 32 decode
   steps at batch 1, and the batch-32 round's prefill-carrying steps.
Writes ``DIR/probe.json`` (figures) and ``DIR/profile_*.txt`` (tables); prints RESULT lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf


def _bench(engine, bs: int, num: int, isl: int) -> dict:
    from autodeploy.bench.benchmark import run_batch_size

    cfg = OmegaConf.create({"enabled": True, "bs": bs, "batch_sizes": [], "isl": isl, "osl": 128, "num": num,
                            "warmup": 2})
    r = run_batch_size(engine, cfg, bs)
    out = {k: (v["p50"] if isinstance(v, dict) and "p50" in v else v) for k, v in r.items() if k != "itl_trace"}
    out["ttft_max_ms"], out["itl_p99_ms"] = r["ttft_ms"].get("max"), r["itl_ms"].get("p99")
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _profile(engine, name: str, out: Path, run, setup=None) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    state = setup() if setup is not None else None
    _sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        steps = run(state) if setup is not None else run()
        _sync()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90)
    total_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    header = f"{name}: {steps} steps, device kernel time {total_us / 1e3:.2f} ms in all\n"
    (out / f"profile_{name}.txt").write_text(header + table)
    print(header + "\n".join(table.splitlines()[:28]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="llama3_8b")
    parser.add_argument("--num", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--isl", type=int, default=1024)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from autodeploy import LLM, SamplingParams
    from autodeploy.bench.benchmark import random_prompts

    t0 = time.perf_counter()
    gpu = dict(attn_backend="triton", compile_backend="torch-opt", cuda_graph_batch_sizes=[1, 32], free_mem_ratio=0.3)
    llm = LLM(args.model, max_batch_size=32, **(gpu if torch.cuda.is_available() else {"max_seq_len": 1200}))
    record = {"build_s": time.perf_counter() - t0,
              "build_stage_s": {r["name"]: round(r["time_s"], 2) for r in llm.build_report}}
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompt = random_prompts(1, args.isl, engine.vocab_size)
    t0 = time.perf_counter()
    engine.generate(prompt, greedy)
    record["first_prefill_s"] = time.perf_counter() - t0
    print(f"RESULT build_s={record['build_s']:.1f} first_prefill_s={record['first_prefill_s']:.1f} "
          f"stages={record['build_stage_s']}", flush=True)

    for overlap in (False, True):
        engine.overlap = overlap
        for bs in (1, 32):
            r = _bench(engine, bs, args.num, args.isl)
            record[f"overlap={overlap} bs={bs}"] = r
            print(f"RESULT overlap={overlap} bs={bs} decode_tok_s={r['decode_tok_s']:.1f} itl_ms={r['itl_ms']:.3f} "
                  f"tpot_ms={r['tpot_ms']:.3f} ttft_ms={r['ttft_ms']:.2f} ttft_max_ms={r['ttft_max_ms']:.1f} "
                  f"output_tok_s={r['output_tok_s']:.1f} "
                  f"host_ms={r['decode_host_ms_per_step']:.3f} wait_ms={r['decode_wait_ms_per_step']:.3f} "
                  f"steps={r['num_steps']}", flush=True)

    if not args.no_profile:
        def prefill():
            engine.generate(prompt, greedy)
            return 1

        def start_bs1():
            reqs = engine.add_requests(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
            for _ in range(4):  # the prefill and a few decodes stay outside the profile
                engine.step()
            return reqs

        def decode_bs1(reqs):
            n = 0
            while not reqs[0].finished:
                engine.step()
                n += 1
            return n

        def bs32_prefill_steps():
            ps = random_prompts(32, args.isl, engine.vocab_size)
            reqs = engine.add_requests(ps, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
            n = 0
            while not all(r.finished for r in reqs):
                engine.step()
                n += 1
            return n

        _profile(engine, f"prefill_{args.isl}", args.out, prefill)
        _profile(engine, "decode_bs1", args.out, decode_bs1, setup=start_bs1)
        _profile(engine, "prefill_bs32", args.out, bs32_prefill_steps)
    (args.out / "probe.json").write_text(json.dumps(record, indent=1, default=str))
    llm.shutdown()


if __name__ == "__main__":
    main()
