"""Where a step's time goes on the GPU, and what the engine-level switches change, in one process.

    python3 scripts/perf_probe.py --out DIR [--model llama3_8b] [--num 3] [--no-profile] [--overlap both|on|off]
        [--set transforms.compile_model.compiles=dynamic ...] [--chunk-sizes 4096,8192] [--prefill-graphs both]

One build of the model (triton attention, torch-opt, CUDA graphs for decode batches 1 and 32, the
default pipeline), then:
1. the first request's prefill, timed alone (it includes any compile torch.compile defers to it);
2. the benchmark (isl 1024, osl 128) at batch 1 and 32 with the overlap scheduler off, then on;
3. with --chunk-sizes: batch 32 again (overlap on) with each prefill_chunk_size, on the same engine;
   ``--prefill-graphs both`` runs 2. also with the one-prompt prefill CUDA graphs set aside (eager);
4. the one-prompt prefill taken apart: the step's host time, the forward's device time (CUDA events
   around the model call) and what the host waits for after it;
5. with --profile (default on): torch.profiler kernel tables of a 1024-token prefill, 32 decode
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


def _profile(engine, name: str, out: Path, run, setup=None, trace: bool = False) -> None:
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
    if trace:  # the timeline (chrome://tracing, or scripts/perf_summary.py-style analysis), gzipped
        import gzip
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
            with open(os.path.join(tmp, "trace.json"), "rb") as f:
                raw = f.read()
        header += _idle_gaps(json.loads(raw))
        packed = gzip.compress(raw)
        if len(packed) < 6 * 2**20:  # the device tool brings back up to 16 MiB per file (diag tars them)
            (out / f"trace_{name}.json.gz").write_bytes(packed)
    (out / f"profile_{name}.txt").write_text(header + table)
    print(header + "\n".join(table.splitlines()[:28]), flush=True)


def _idle_gaps(trace: dict, top: int = 12) -> str:
    """Where the GPU sat idle between the first and the last kernel (or memcpy/memset) of a
    chrome trace: busy time, idle time, and the longest gaps with the device work on either side."""
    work = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?")) for e in trace.get("traceEvents", [])
                  if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not work:
        return ""
    gaps, busy, end, prev = [], 0.0, work[0][0], work[0][2]
    for start, stop, name in work:
        if start > end:
            gaps.append((start - end, start - work[0][0], prev, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, prev = stop, name
    span = end - work[0][0]
    over_50 = sum(g for g, *_ in gaps if g > 50)
    lines = [(f"GPU span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, idle {(span - busy) / 1e3:.2f} ms "
              f"in {len(gaps)} gaps (those over 50 us: {over_50 / 1e3:.2f} ms)")]
    for gap, at, before, after in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  gap {gap:8.1f} us at {at / 1e3:8.2f} ms: {before[:50]} -> {after[:50]}")
    return "\n".join(lines) + "\n"


def _prefill_parts(engine, prompt, greedy, reps: int = 5) -> dict:
    """One-prompt prefills with the overlap scheduler off, each taken apart (medians, ms): ``wall``
    of generate(), the engine step's ``host`` time and its ``wait`` for the ids, the model call's
    host time (``launch``) and the forward's device time (``forward``, CUDA events around the call)."""
    import statistics

    cuda = torch.cuda.is_available()
    model, overlap = engine.model, engine.overlap
    parts: dict[str, list[float]] = {k: [] for k in ("wall", "host", "wait", "launch", "forward")}

    class Timed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else []
            for e in ev[:1]:
                e.record()
            t0 = time.perf_counter()
            out = self.inner(**kw)
            parts["launch"].append((time.perf_counter() - t0) * 1e3)
            for e in ev[1:]:
                e.record()
            events.append(ev)
            return out

    events: list = []
    engine.model, engine.overlap = Timed(model), False
    try:
        for _ in range(reps):
            engine.step_timings.clear()
            _sync()
            t0 = time.perf_counter()
            engine.generate(prompt, greedy)
            parts["wall"].append((time.perf_counter() - t0) * 1e3)
            s = engine.step_timings[-1]
            parts["host"].append(s.host_s * 1e3)
            parts["wait"].append(s.wait_s * 1e3)
        _sync()
        if cuda:
            parts["forward"] = [a.elapsed_time(b) for a, b in events]
    finally:
        engine.model, engine.overlap = model, overlap
    return {k: round(statistics.median(v), 3) for k, v in parts.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="llama3_8b")
    parser.add_argument("--num", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profiles", default="prefill,decode_bs1,prefill_bs32",
                        help="which kernel tables to write (comma-separated)")
    parser.add_argument("--trace", action="store_true", help="also write each profile's timeline (trace_*.json.gz)")
    parser.add_argument("--isl", type=int, default=1024)
    parser.add_argument("--overlap", choices=("both", "on", "off"), default="both")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="LLM keyword overrides, dotted (transforms.compile_model.compiles=dynamic)")
    parser.add_argument("--chunk-sizes", default="",
                        help="bs-32 runs on the same engine, comma-separated: C (prefill_chunk_size), or "
                             "C:M (also the scheduler's max_num_tokens, at most the built one)")
    parser.add_argument("--prefill-graphs", choices=("both", "on"), default="on",
                        help="both: the benchmarks also with the one-prompt prefill CUDA graphs set aside (eager prefills)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from autodeploy import LLM, SamplingParams
    from autodeploy.bench.benchmark import random_prompts

    t0 = time.perf_counter()
    gpu = dict(attn_backend="triton", compile_backend="torch-opt", cuda_graph_batch_sizes=[1, 32], free_mem_ratio=0.3)
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.set))
    kwargs = {**(gpu if torch.cuda.is_available() else {"max_seq_len": 1200}), **overrides}
    llm = LLM(args.model, max_batch_size=32, **kwargs)
    record = {"overrides": overrides, "build_s": time.perf_counter() - t0,
              "build_phases_s": {k: round(v, 2) for k, v in llm.build_phases.items()},
              "build_stage_s": {r["name"]: round(r["time_s"], 2) for r in llm.build_report}}
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompt = random_prompts(1, args.isl, engine.vocab_size)
    t0 = time.perf_counter()
    engine.generate(prompt, greedy)
    record["first_prefill_s"] = time.perf_counter() - t0
    print(f"RESULT build_s={record['build_s']:.1f} first_prefill_s={record['first_prefill_s']:.1f} "
          f"phases={record['build_phases_s']} stages={record['build_stage_s']}", flush=True)

    default_chunk = engine.scheduler.prefill_chunk_size
    graphs = {"both": (False, True), "on": (True,)}[args.prefill_graphs]
    # (overlap, bs, prefill_chunk_size, max_num_tokens or 0 for the built one, prefill graphs)
    runs = [(o, bs, default_chunk, 0, g) for o in {"both": (False, True), "on": (True,), "off": (False,)}[args.overlap]
            for bs in (1, 32) for g in graphs]
    runs += [(True, 32, *(int(x) for x in (c + ":0").split(":")[:2]), True) for c in args.chunk_sizes.split(",") if c]
    built_max = engine.scheduler.max_num_tokens
    captured = dict(getattr(engine.model, "prefill_graphs", {}))  # the CUDA-graph runner's
    for overlap, bs, chunk, max_tokens, with_graphs in runs:
        engine.overlap = overlap
        engine.scheduler.prefill_chunk_size = chunk
        engine.scheduler.max_num_tokens = min(max_tokens or built_max, built_max)
        if captured:
            engine.model.prefill_graphs = captured if with_graphs else {}
        r = _bench(engine, bs, args.num, args.isl)
        tag = (f"overlap={overlap} bs={bs}" + (f" chunk={chunk}" if chunk != default_chunk else "")
               + (f" max_tokens={max_tokens}" if max_tokens else "")
               + (f" prefill_graphs={with_graphs}" if len(graphs) > 1 else ""))
        record[tag] = r
        print(f"RESULT {tag} decode_tok_s={r['decode_tok_s']:.1f} itl_ms={r['itl_ms']:.3f} "
              f"tpot_ms={r['tpot_ms']:.3f} ttft_ms={r['ttft_ms']:.2f} ttft_max_ms={r['ttft_max_ms']:.1f} "
              f"output_tok_s={r['output_tok_s']:.1f} "
              f"host_ms={r['decode_host_ms_per_step']:.3f} wait_ms={r['decode_wait_ms_per_step']:.3f} "
              f"steps={r['num_steps']}", flush=True)
    engine.scheduler.prefill_chunk_size = default_chunk
    engine.scheduler.max_num_tokens = built_max
    if captured:
        engine.model.prefill_graphs = {}
        record["prefill_parts_eager"] = _prefill_parts(engine, prompt, greedy)
        print(f"RESULT prefill_parts_eager {record['prefill_parts_eager']}", flush=True)
        engine.model.prefill_graphs = captured
    record["prefill_parts"] = _prefill_parts(engine, prompt, greedy)
    print(f"RESULT prefill_parts {record['prefill_parts']}", flush=True)

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

        wanted = set(args.profiles.split(","))
        if "prefill" in wanted:
            _profile(engine, f"prefill_{args.isl}", args.out, prefill, trace=args.trace)
        if "decode_bs1" in wanted:
            _profile(engine, "decode_bs1", args.out, decode_bs1, setup=start_bs1, trace=args.trace)
        if "prefill_bs32" in wanted:
            _profile(engine, "prefill_bs32", args.out, bs32_prefill_steps, trace=args.trace)
    (args.out / "probe.json").write_text(json.dumps(record, indent=1, default=str))
    llm.shutdown()


if __name__ == "__main__":
    main()
