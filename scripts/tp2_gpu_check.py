"""Issue 25's targets on two GPUs, in one table: TP=2 against TP=1, the fused all-reduce + add +
RMSNorm on and off, and the Mixtral-8x7B shape with expert and tensor parallelism.

    python3 scripts/tp2_gpu_check.py --out DIR [--parts llama greedy mixtral mixtral_greedy]
    python3 scripts/tp2_gpu_check.py --table DIR [DIR ...]    # the table of runs already made

Parts (each run is a process of its own, on GPU 0 for one rank and GPUs 0,1 for two; a run that fails
or times out is a row with its error, the others go on; the build cache is off so every run builds
the real path, symmetric-memory set-up included):
- ``llama`` (~4 min): Llama-3.1-8B shape, random bf16, triton attention, torch-opt, CUDA graphs for
  batch 1 and 32, isl 1024, osl 128 at batch 1 and 32: TP=1, TP=2, TP=2 with
  ``fuse_allreduce_residual_rmsnorm`` off. Decode tok/s, TTFT, host ms per decode step of each
  rank, the roofline fraction.
- ``greedy`` (~2 min): the same shape cut to 4 layers in fp32 (torch-cudagraph: the decode graphs
  hold the collectives): greedy tokens of TP=2 (fusion on and off) against TP=1.
- ``mixtral`` (~8 min; world_size 1 needs ~100 GB: an H200): Mixtral-8x7B shape, random bf16,
  ``experiment=mixtral_ep2`` (EP=2), TP=2 (``sharding=tp``) and world_size 1, batch 1 and 32; the
  roofline fraction, and the fraction of the MoE floor (attention and the experts a step really
  reads, per rank: see ``moe_floor``).
- ``mixtral_greedy`` (~3 min): Mixtral shape cut to 4 layers in fp32: greedy tokens of the three.

On the device tool's 10-minute calls: ``--parts llama greedy`` in one, ``--parts mixtral`` in
another and ``--parts mixtral_greedy`` in a third (nvidia-h200-x2), then ``--table DIR1 DIR2 DIR3``. Writes
``DIR/<run>.json`` per run (and its log, or in ``--logs``) and prints the table of DIR's runs at the end.
Not run yet on GPUs (written without two GPUs at hand); ``--smoke`` runs it with the tiny models on
the CPU, which checks the script, not the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LLAMA = ["model=llama3_8b", "backend=triton", "transforms/compile=torch-opt"]
MIXTRAL = ["model=mixtral_8x7b", "backend=triton", "transforms/compile=torch-opt"]
PERF_ARGS = {"max_batch_size": 32, "cuda_graph_batch_sizes": [1, 32], "free_mem_ratio": 0.3}
UNFUSED = {"fuse_allreduce_residual_rmsnorm": {"enabled": False}}
GREEDY_ARGS = {"dtype": "float32", "model_kwargs": {"num_hidden_layers": 4}, "max_batch_size": 8,
               "compile_backend": "torch-cudagraph", "free_mem_ratio": 0.3}

# name -> (part, hydra overrides, args fields, world_size, what to run, timeout s)
RUNS = {
    "llama_tp1": ("llama", LLAMA, PERF_ARGS, 1, "bench", 330),
    "llama_tp2": ("llama", LLAMA, PERF_ARGS, 2, "bench", 330),
    "llama_tp2_unfused": ("llama", LLAMA, {**PERF_ARGS, "transforms": UNFUSED}, 2, "bench", 330),
    "llama_fp32_tp1": ("greedy", LLAMA, GREEDY_ARGS, 1, "greedy", 240),
    "llama_fp32_tp2": ("greedy", LLAMA, GREEDY_ARGS, 2, "greedy", 240),
    "llama_fp32_tp2_unfused": ("greedy", LLAMA, {**GREEDY_ARGS, "transforms": UNFUSED}, 2, "greedy", 240),
    "mixtral_ep2": ("mixtral", ["experiment=mixtral_ep2", "backend=triton", "transforms/compile=torch-opt"],
                    PERF_ARGS, 2, "bench", 480),
    "mixtral_tp2": ("mixtral", [*MIXTRAL, "sharding=tp"], PERF_ARGS, 2, "bench", 480),
    "mixtral_ws1": ("mixtral", MIXTRAL, PERF_ARGS, 1, "bench", 480),
    "mixtral_fp32_ws1": ("mixtral_greedy", MIXTRAL, GREEDY_ARGS, 1, "greedy", 300),
    "mixtral_fp32_ep2": ("mixtral_greedy", ["experiment=mixtral_ep2", "backend=triton"], GREEDY_ARGS, 2, "greedy", 300),
    "mixtral_fp32_tp2": ("mixtral_greedy", [*MIXTRAL, "sharding=tp"], GREEDY_ARGS, 2, "greedy", 300),
}
GREEDY_PAIRS = [("llama_fp32_tp2", "llama_fp32_tp1"), ("llama_fp32_tp2_unfused", "llama_fp32_tp1"),
                ("mixtral_fp32_ep2", "mixtral_fp32_ws1"), ("mixtral_fp32_tp2", "mixtral_fp32_ws1")]


# ----- one run (a child process) ---------------------------------------------------------------------


def _prompts(vocab: int) -> list[list[int]]:
    """Token-id prompts: one past a prefill chunk and many KV pages, six short ones."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (700, 150, 64, 64, 33, 17, 5)]


def moe_floor(config, result: dict, world: int, mode: str, bs: int, samples: int = 4000) -> "dict | None":
    """The decode-step floor of an MoE model counting only the experts a step reads, per rank.

    The benchmark's roofline counts every weight of rank 0; at small batches an MoE step reads only
    the experts its tokens chose. Here: rank 0's streamed bytes, less its experts, plus the experts
    the slowest rank reads, expected over uniform top-k routing (random weights route about
    uniformly), layer by layer (the ranks meet at every layer's all-reduce): EP splits the experts
    in contiguous blocks, TP reads its half of every chosen expert, one rank reads all chosen ones."""
    import torch

    roof = result.get("roofline")
    experts, top_k = getattr(config, "num_local_experts", None), getattr(config, "num_experts_per_tok", None)
    if not roof or not experts or not top_k or not roof.get("params"):
        return None
    itemsize = roof["weight_gb"] * 1e9 / roof["params"]  # the weights' dtype
    expert_bytes = 3 * config.hidden_size * config.intermediate_size * itemsize  # gate, up, down
    gen = torch.Generator().manual_seed(0)
    chosen = torch.rand(samples, bs, experts, generator=gen).topk(top_k, dim=-1).indices  # a layer's routing
    active = torch.zeros(samples, experts, dtype=torch.bool).scatter_(1, chosen.flatten(1), True)
    if mode == "ep":  # each rank holds experts // world whole experts; the busiest rank sets the pace
        experts_read = active.view(samples, world, experts // world).sum(-1).max(-1).values.float().mean().item()
        held, read = experts // world * expert_bytes, experts_read * expert_bytes
    else:  # tp: 1/world of every expert on each rank; one rank: all of them
        experts_read = active.sum(-1).float().mean().item()
        held, read = experts * expert_bytes / world, experts_read * expert_bytes / world
    layers = config.num_hidden_layers
    context = result["isl"] + (result["osl"] - 1) / 2
    step_bytes = roof["weight_gb"] * 1e9 - layers * (held - read) + bs * context * roof["kv_bytes_per_token"]
    step_ms = step_bytes / (roof["copy_bw_tb_s"] * 1e12) * 1e3
    itl = result["itl_ms"].get("p50")
    return {"step_gb": step_bytes / 1e9, "floor_ms": step_ms, "floor_tok_s": bs * 1e3 / step_ms,
            "fraction": step_ms / itl if itl else None, "experts_read_per_layer": experts_read}


def _smoke(overrides: list[str], args: dict) -> tuple[list[str], dict]:
    """``--smoke``: the same runs with the tiny models on the CPU (checks this script, not the targets)."""
    tiny = {"model=llama3_8b": ["model=tiny_llama"], "model=mixtral_8x7b": ["model=tiny_mixtral"],
            "experiment=mixtral_ep2": ["model=tiny_mixtral", "sharding=ep"]}
    overrides = [o for x in overrides if not x.startswith(("backend=", "transforms/compile=")) for o in tiny.get(x, [x])]
    args = {k: v for k, v in args.items() if k in ("transforms", "max_batch_size")}
    return overrides, {**args, "device": "cpu", "dtype": "float32", "max_seq_len": 1024, "compile_backend": "torch-simple"}


def run_one(name: str, out: Path, smoke: bool = False) -> None:
    import logging

    import torch
    from omegaconf import OmegaConf

    from autodeploy import LLM, SamplingParams
    from autodeploy.bench.benchmark import run_benchmark
    from autodeploy.config import compose_experiment

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _, overrides, args, world, what, _ = RUNS[name]
    if smoke:
        overrides, args = _smoke(overrides, args)
    isl, osl, num = (32, 8, 1) if smoke else (1024, 128, 3)
    t0 = time.perf_counter()
    config = compose_experiment(overrides, extra_layer={"args": {**args, "world_size": world}})
    llm = LLM.from_config(config)
    record = {"name": name, "world_size": world, "build_s": time.perf_counter() - t0,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "fusion": next((r["note"] for r in llm.build_report if r["name"] == "fuse_allreduce_residual_rmsnorm"), None),
              "sharding_summary": llm.sharding_plan.summary() if llm.sharding_plan is not None else None}
    try:
        if what == "greedy":
            outs = llm.generate(_prompts(llm.engine.vocab_size), SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                                use_tqdm=False)
            record["tokens"] = [o.token_ids for o in outs]
            record["errors"] = [o.error for o in outs if o.error]
        else:
            bench = OmegaConf.create({"enabled": True, "bs": 1, "batch_sizes": [32], "isl": isl, "osl": osl, "num": num,
                                      "warmup": 2, "compare_hf": False})
            result = run_benchmark(llm.engine, bench, factory=llm.factory)
            record["benchmark"] = {}
            mode = "ep" if "ep2" in name else ("tp" if world > 1 else "one")
            for bs, r in result["by_batch_size"].items():
                r = {k: v for k, v in r.items() if k != "itl_trace"}
                if name.startswith("mixtral"):
                    r["moe_floor"] = moe_floor(llm.factory.config, r, world, mode, int(bs))
                record["benchmark"][bs] = r
    finally:
        llm.shutdown()
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))


# ----- the driver and the table ------------------------------------------------------------------


def run_parts(parts: list[str], out: Path, logs: Path, smoke: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AUTODEPLOY_BUILD_CACHE": "0", "PYTHONUNBUFFERED": "1"}
    for name, (part, _, _, world, _, timeout) in RUNS.items():
        if part not in parts:
            continue
        t0 = time.perf_counter()
        log = logs / f"{name}.log"
        devices = "0" if world == 1 else ",".join(str(i) for i in range(world))
        cmd = [sys.executable, __file__, "--run", name, "--out", str(out), *(["--smoke"] if smoke else [])]
        with open(log, "w") as f:
            try:
                proc = subprocess.run(cmd, env={**env, "CUDA_VISIBLE_DEVICES": devices}, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=timeout)
                error = None if proc.returncode == 0 else f"exit code {proc.returncode}"
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout} s"
        if error is not None or not (out / f"{name}.json").exists():
            tail = [line for line in log.read_text(errors="replace").splitlines() if "Error" in line][-2:]
            (out / f"{name}.json").write_text(json.dumps({"name": name, "error": f"{error}: {' | '.join(tail)}"}))
        print(f"{name}: {'ok' if error is None else error} in {time.perf_counter() - t0:.0f} s", flush=True)


def _load(dirs: list[Path]) -> dict[str, dict]:
    found = {}
    for d in dirs:
        for path in sorted(Path(d).glob("*.json")):
            record = json.loads(path.read_text())
            if record.get("name") in RUNS:
                found[record["name"]] = record
    return found


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(dirs: list[Path]) -> str:
    runs = _load(dirs)
    lines = ["| run | bs | decode tok/s | vs TP=1 | TTFT p50 ms | vs TP=1 | host ms/decode step by rank | roofline | MoE floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    baseline = {"llama": "llama_tp1", "mixtral": "mixtral_ws1"}
    for name, record in runs.items():
        if "benchmark" not in record and "error" not in record:
            continue
        if "error" in record:
            lines.append(f"| {name} | | error: {record['error'][:120]} | | | | | | |")
            continue
        base = runs.get(baseline[name.split("_")[0]], {}).get("benchmark", {})
        for bs, r in record["benchmark"].items():
            b = base.get(bs, {})
            decode, ttft = r.get("decode_tok_s"), r["ttft_ms"].get("p50")
            speedup = decode / b["decode_tok_s"] if b.get("decode_tok_s") and decode else None
            ttft_ratio = ttft / b["ttft_ms"]["p50"] if b.get("ttft_ms") and ttft else None
            hosts = "/".join(_fmt(h, ".2f") for h in r.get("decode_host_ms_per_step_by_rank") or [])
            roof = (r.get("roofline") or {}).get("decode_fraction")
            moe = (r.get("moe_floor") or {}).get("fraction")
            lines.append(f"| {name} | {bs} | {_fmt(decode)} | {_fmt(speedup, '.2f')}x | {_fmt(ttft)} | "
                         f"{_fmt(ttft_ratio, '.2f')}x | {hosts} | {_fmt(roof, '.0%')} | {_fmt(moe, '.0%')} |")
    lines.append("")
    for a, b in GREEDY_PAIRS:
        if a in runs and b in runs:
            ta, tb = runs[a].get("tokens"), runs[b].get("tokens")
            if ta is None or tb is None:
                lines.append(f"greedy {a} vs {b}: missing ({runs[a].get('error') or runs[b].get('error')})")
                continue
            same = sum(x == y for x, y in zip(ta, tb))
            pos = sum(p == q for x, y in zip(ta, tb) for p, q in zip(x, y))
            errors = len(runs[a].get("errors") or []) + len(runs[b].get("errors") or [])
            lines.append(f"greedy fp32 {a} vs {b}: {same}/{len(tb)} sequences equal, {pos}/{sum(map(len, tb))} tokens"
                         + (f", {errors} request errors (see the JSON)" if errors else ""))
    lines += _targets(runs)
    fusion = {n: r.get("fusion") for n, r in runs.items() if r.get("world_size", 1) > 1 and r.get("fusion")}
    lines += [f"fusion {n}: {note}" for n, note in fusion.items()]
    devices = sorted({r["device"] for r in runs.values() if "device" in r})
    lines.append(f"devices: {', '.join(devices) or '-'}")
    return "\n".join(lines)


def _targets(runs: dict) -> list[str]:
    """Issue 25's targets, each with its figure (same run, TP=1 beside it)."""
    def bench(name, bs):
        return runs.get(name, {}).get("benchmark", {}).get(str(bs), {})

    out = ["", "targets:"]
    for bs, need in ((1, 1.6), (32, 1.5)):
        one, two = bench("llama_tp1", bs).get("decode_tok_s"), bench("llama_tp2", bs).get("decode_tok_s")
        if one and two:
            out.append(f"  TP=2 batch-{bs} decode >= {need}x TP=1: {two / one:.2f}x {'PASS' if two / one >= need else 'FAIL'}")
    one, two = bench("llama_tp1", 1).get("ttft_ms", {}).get("p50"), bench("llama_tp2", 1).get("ttft_ms", {}).get("p50")
    if one and two:
        out.append(f"  TP=2 batch-1 TTFT <= 0.7x TP=1: {two / one:.2f}x {'PASS' if two / one <= 0.7 else 'FAIL'}")
    moe = (bench("mixtral_ep2", 1).get("moe_floor") or {}).get("fraction")
    if moe is not None:
        out.append(f"  Mixtral EP=2 batch-1 decode >= 70% of its floor: {moe:.0%} {'PASS' if moe >= 0.7 else 'FAIL'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--parts", nargs="+", default=["llama", "greedy", "mixtral", "mixtral_greedy"],
                        choices=["llama", "greedy", "mixtral", "mixtral_greedy"])
    parser.add_argument("--run", help=argparse.SUPPRESS)  # a child: one run of RUNS
    parser.add_argument("--table", type=Path, nargs="+", help="print the table of these folders' runs")
    parser.add_argument("--logs", type=Path, help="the runs' logs (default: --out)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks this script, not the targets")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
    elif args.run:
        run_one(args.run, args.out, args.smoke)
    else:
        if args.out is None:
            parser.error("--out DIR is required")
        # a `timeout` that ends this driver ends the run it waits for too (subprocess.run kills it on the way out)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        run_parts(args.parts, args.out, args.logs or args.out, args.smoke)
        print(table([args.out]))


if __name__ == "__main__":
    main()
