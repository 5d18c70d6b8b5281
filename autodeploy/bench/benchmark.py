"""``benchmark.enabled``: fixed-shape latency/throughput through the engine, optional HF baseline.

``bs`` requests of ``isl`` random prompt tokens each generate exactly ``osl`` tokens (greedy,
``ignore_eos``), ``warmup`` untimed rounds then ``num`` timed rounds. Latencies come from the
engine's per-token host timestamps (taken after the sampled ids reach the host, so they include
device time). Definitions (as vLLM's): TTFT = first token - arrival; TPOT = (e2e - TTFT) /
(osl - 1); ITL = gaps between consecutive tokens; throughput = tokens / wall time of a round.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

log = logging.getLogger(__name__)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    xs = sorted(values)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]

    return {"mean": statistics.fmean(xs), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def random_prompts(bs: int, isl: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (bs, isl), generator=gen).tolist()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_benchmark(engine: Any, bench: Any, factory: Any = None) -> dict[str, Any]:
    from autodeploy.runtime.sampling_params import SamplingParams

    bs, isl, osl = int(bench.bs), int(bench.isl), int(bench.osl)
    prompts = random_prompts(bs, isl, engine.vocab_size)
    params = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    for _ in range(int(bench.warmup)):
        _round(engine, prompts, params)
    ttft, tpot, itl, e2e, walls = [], [], [], [], []
    for _ in range(int(bench.num)):
        outs, wall = _round(engine, prompts, params)
        walls.append(wall)
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
    wall = statistics.median(walls)
    result = {
        "bs": bs, "isl": isl, "osl": osl, "num": int(bench.num), "warmup": int(bench.warmup),
        "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot), "itl_ms": percentiles(itl),
        "e2e_ms": percentiles(e2e), "wall_s": wall,
        "output_tok_s": bs * osl / wall, "total_tok_s": bs * (isl + osl) / wall,
    }
    if getattr(bench, "compare_hf", False):
        result["hf_baseline"] = hf_baseline(factory, engine.cache.device, prompts, osl, int(bench.num))
    log.info("benchmark bs=%d isl=%d osl=%d: %.1f output tok/s, TTFT p50 %.1f ms, TPOT p50 %.2f ms",
             bs, isl, osl, result["output_tok_s"], result["ttft_ms"].get("p50", float("nan")),
             result["tpot_ms"].get("p50", float("nan")))
    return result


def _round(engine: Any, prompts: list[list[int]], params: Any):
    _sync()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    _sync()
    return outs, time.perf_counter() - t0


def hf_baseline(factory: Any, device: torch.device, prompts: list[list[int]], osl: int, num: int) -> dict[str, Any]:
    """HF transformers eager ``generate`` on the same prompts, same device, same process."""
    if factory is None:
        raise ValueError("benchmark.compare_hf needs the model factory")
    model = factory.build_model("meta")
    factory.load_weights(model, device)
    model.config.use_cache = True
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(do_sample=False, max_new_tokens=osl, min_new_tokens=osl, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm-up
        walls, ttfts = [], []
        for _ in range(num):
            _sync()
            t0 = time.perf_counter()
            model.generate(ids, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
            _sync()
            ttfts.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            model.generate(ids, **kwargs)
            _sync()
            walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    del model
    return {"output_tok_s": len(prompts) * osl / wall, "ttft_ms": percentiles(ttfts), "wall_s": wall}
