"""``benchmark.enabled``: fixed-shape latency/throughput through the engine, optional HF baselines.

``bs`` requests of ``isl`` random prompt tokens each generate exactly ``osl`` tokens (greedy,
``ignore_eos``), ``warmup`` untimed rounds then ``num`` timed rounds; ``batch_sizes`` adds more
sizes on the same engine (``by_batch_size``). Latencies come from the engine's per-token host
timestamps (taken after the sampled ids reach the host, so they include device time).
Definitions (as vLLM's): TTFT = first token - arrival; TPOT = (e2e - TTFT) / (osl - 1); ITL = gaps
between consecutive tokens; throughput = tokens / wall time of a round. Derived (docs/performance.md):
- ``decode_tok_s`` = bs / ITL p50: the steady decode rate (a step that also prefills shows up in
  ITL's tail, not its median); ``tpot_tok_s`` = bs / TPOT p50 includes those stalls;
- ``host_ms_per_step`` / ``decode_host_ms_per_step``: the engine's own time per step (scheduling,
  metadata, launches, sampling, commit: everything but waiting for the device), all steps / decode
  steps; ``decode_wait_ms_per_step``: the wait for the device in decode steps;
- ``decode_host_ms_per_step_by_rank`` / ``decode_wait_ms_per_step_by_rank``: the mean per decode
  step of every rank, rank 0 first (as above); a worker's host time runs from the step's inputs in
  hand to its forward launched, its wait is for rank 0's message (``distributed/ranks.py`` StepTimes);
- ``roofline`` (CUDA only, else None): the copy bandwidth and matmul rate measured in this run,
  the bytes a decode step must read, the floors they give, ``decode_fraction`` = decode step floor
  / ITL p50 and ``prefill_fraction`` = bs prompts' matmul floor / the last TTFT (the floor at the
  burst matmul rate; ``prefill_fraction_sustained`` at the rate the card holds under load);
- ``peak_gpu_mem_gib``: peak allocated GPU memory of the process (build included), None off CUDA.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Optional

import torch

from . import roofline
from .progress import Progress
from .stats import percentiles

log = logging.getLogger(__name__)

__all__ = ["percentiles", "random_prompts", "run_benchmark", "run_batch_size"]


def random_prompts(bs: int, isl: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (bs, isl), generator=gen).tolist()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _round(engine: Any, prompts: list[list[int]], params: Any):
    _sync()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    _sync()
    return outs, t0, time.perf_counter() - t0


def batch_sizes(bench: Any) -> list[int]:
    """``bs`` first, then the other ``batch_sizes`` in the given order."""
    sizes = [int(bench.bs)]
    for b in getattr(bench, "batch_sizes", None) or []:
        if int(b) not in sizes:
            sizes.append(int(b))
    return sizes


def run_batch_size(engine: Any, bench: Any, bs: int) -> dict[str, Any]:
    """Warm-up and timed rounds at one batch size; every figure of the module docstring."""
    from autodeploy.runtime.sampling_params import SamplingParams

    isl, osl = int(bench.isl), int(bench.osl)
    prompts = random_prompts(bs, isl, engine.vocab_size)
    params = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    warmup, num = int(bench.warmup), int(bench.num)
    log.info("benchmark bs=%d isl=%d osl=%d: %d warm-up and %d timed rounds", bs, isl, osl, warmup, num)
    progress = Progress(warmup + num, f"benchmark bs={bs}")
    for _ in range(warmup):
        _round(engine, prompts, params)
        progress.update()
    engine.step_timings.clear()
    ranks = getattr(engine, "ranks", None)
    workers_before = ranks.worker_step_times() if ranks is not None else {}
    ttft, tpot, itl, e2e, walls, trace = [], [], [], [], [], {}
    for _ in range(num):
        outs, start, wall = _round(engine, prompts, params)
        progress.update()
        walls.append(wall)
        trace = {"t_s": [], "itl_ms": []}  # the last round's tokens over time (for the plot)
        for o in outs:
            m = o.metrics
            if o.error:
                raise RuntimeError(f"benchmark request failed: {o.error}")
            first, last = m.token_times[0] - m.arrival_time, m.token_times[-1] - m.arrival_time
            ttft.append(first * 1e3)
            e2e.append(last * 1e3)
            if len(m.token_times) > 1:
                tpot.append((last - first) * 1e3 / (len(m.token_times) - 1))
            itl.extend(x * 1e3 for x in m.itl)
            trace["t_s"] += [round(t - start, 5) for t in m.token_times[1:]]
            trace["itl_ms"] += [round(x * 1e3, 4) for x in m.itl]
    progress.close()
    wall = statistics.median(walls)
    steps = list(engine.step_timings)
    decode_steps = [s for s in steps if s.is_decode]
    workers_after = ranks.worker_step_times() if ranks is not None else {}
    result = {
        "bs": bs, "isl": isl, "osl": osl, "num": int(bench.num), "warmup": int(bench.warmup),
        "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot), "itl_ms": percentiles(itl),
        "e2e_ms": percentiles(e2e), "wall_s": wall,
        "output_tok_s": bs * osl / wall, "total_tok_s": bs * (isl + osl) / wall,
    }
    result.update({
        "decode_tok_s": bs * 1e3 / result["itl_ms"]["p50"] if itl else None,
        "tpot_tok_s": bs * 1e3 / result["tpot_ms"]["p50"] if tpot else None,
        "num_steps": len(steps) // max(int(bench.num), 1),
        "host_ms_per_step": percentiles([s.host_s * 1e3 for s in steps]),
        "decode_host_ms_per_step": percentiles([s.host_s * 1e3 for s in decode_steps]),
        "decode_wait_ms_per_step": percentiles([s.wait_s * 1e3 for s in decode_steps]),
        "decode_host_ms_per_step_by_rank": _per_rank(decode_steps, "host_s", workers_before, workers_after),
        "decode_wait_ms_per_step_by_rank": _per_rank(decode_steps, "wait_s", workers_before, workers_after),
        "roofline": None,
        "itl_trace": trace,
    })
    by_rank = result["decode_host_ms_per_step_by_rank"]
    log.info("benchmark bs=%d isl=%d osl=%d: %.1f output tok/s, %.1f decode tok/s, TTFT p50 %.1f ms, "
             "TPOT p50 %.2f ms, host %.2f ms/decode step%s", bs, isl, osl, result["output_tok_s"],
             result["decode_tok_s"] or float("nan"), result["ttft_ms"].get("p50", float("nan")),
             result["tpot_ms"].get("p50", float("nan")), result["decode_host_ms_per_step"].get("p50", float("nan")),
             f" (mean by rank: {', '.join('-' if m is None else f'{m:.2f}' for m in by_rank)})" if len(by_rank) > 1 else "")
    return result


def _per_rank(decode_steps: list, field: str, before: dict, after: dict) -> list[Optional[float]]:
    """Mean ms per decode step of rank 0 (its step timings) and of each worker (the difference of
    its totals over the timed rounds)."""
    means = [statistics.fmean(getattr(s, field) for s in decode_steps) * 1e3 if decode_steps else None]
    for rank in sorted(after):
        steps = after[rank]["decode_steps"] - before[rank]["decode_steps"]
        seconds = after[rank][f"decode_{field}"] - before[rank][f"decode_{field}"]
        means.append(seconds * 1e3 / steps if steps else None)
    return means


def with_roofline(result: dict[str, Any], ceilings: Optional[dict[str, Any]]) -> dict[str, Any]:
    """``result["roofline"]``: the ceilings, this shape's floors and how close the run came."""
    floors = roofline.floors(ceilings, result["bs"], result["isl"], result["osl"])
    if floors is not None:
        itl_p50, ttft_max = result["itl_ms"].get("p50"), result["ttft_ms"].get("max")
        result["roofline"] = {
            **ceilings, **floors,
            "decode_fraction": floors["decode_step_floor_ms"] / itl_p50 if itl_p50 else None,
            # all bs prompts are prefilled by the time the last first token arrives
            "prefill_fraction": floors["prefill_floor_ms"] * result["bs"] / ttft_max if ttft_max else None,
        }
        if "prefill_floor_sustained_ms" in floors and ttft_max:
            result["roofline"]["prefill_fraction_sustained"] = floors["prefill_floor_sustained_ms"] * result["bs"] / ttft_max
    return result


def run_benchmark(engine: Any, bench: Any, factory: Any = None) -> dict[str, Any]:
    """The result at ``bench.bs`` (its keys at the top level) plus ``by_batch_size`` for every size run."""
    by_size = {bs: run_batch_size(engine, bench, bs) for bs in batch_sizes(bench)}
    # the peak before the ceilings are measured: their buffers are no part of serving
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    ceilings = roofline.measure(engine.model, engine.cache)
    by_size = {bs: with_roofline(r, ceilings) for bs, r in by_size.items()}
    result = dict(by_size[int(bench.bs)])
    result["by_batch_size"] = {str(bs): r for bs, r in by_size.items()}
    result["peak_gpu_mem_gib"] = peak
    if getattr(bench, "compare_hf", False):
        from .hf_baselines import hf_baselines

        prompts = random_prompts(int(bench.bs), int(bench.isl), engine.vocab_size)
        baselines = hf_baselines(factory, engine.cache.device, prompts, int(bench.osl), int(bench.num))
        result["hf_baseline"] = baselines["eager"]  # the key results.json always had for HF eager
        result["hf_static_compile"] = baselines["static_compile"]
    return result
