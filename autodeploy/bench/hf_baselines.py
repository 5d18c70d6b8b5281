"""HF transformers on the same prompts, same device, same process: the baselines beside our figures.

- ``eager``: ``generate`` with its default (dynamic) cache;
- ``static_compile``: ``generate`` with a fixed-size ``StaticCache``, which transformers compiles
  (``torch.compile``, CUDA graphs) on CUDA by itself: its fastest documented setup. The cache is
  sized once and reset before every call, so the compiled graphs are reused. Off CUDA it runs
  uncompiled (transformers compiles on accelerators only) and says so.
Both report TTFT (a one-token ``generate``), decode tok/s and TPOT from the full run minus that.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

from ..eval.reference import cache_arg
from .stats import percentiles

log = logging.getLogger(__name__)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _measure(generate, bs: int, osl: int, num: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        generate(osl)
        generate(1)
    ttfts, walls = [], []
    for _ in range(num):
        ttfts.append(_timed(lambda: generate(1)))
        walls.append(_timed(lambda: generate(osl)))
    wall, ttft = statistics.median(walls), statistics.median(ttfts)
    decode_s = max(wall - ttft, 1e-9)
    return {
        "ttft_ms": percentiles([t * 1e3 for t in ttfts]), "wall_s": wall,
        "output_tok_s": bs * osl / wall,
        "tpot_ms": decode_s * 1e3 / max(osl - 1, 1), "decode_tok_s": bs * max(osl - 1, 1) / decode_s,
    }


def hf_baselines(factory: Any, device: torch.device, prompts: list[list[int]], osl: int, num: int,
                 compile: bool = True) -> dict[str, Any]:
    """``{"eager": {...}, "static_compile": {...}}``; ``compile=False`` keeps the static cache eager."""
    if factory is None:
        raise ValueError("benchmark.compare_hf needs the model factory")
    model = factory.build_model("meta")
    factory.load_weights(model, device)
    try:
        return _measure_both(model.eval(), device, prompts, osl, num, compile and device.type == "cuda")
    finally:
        del model  # its weights leave the GPU before the caller goes on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _measure_both(model: Any, device: torch.device, prompts: list[list[int]], osl: int, num: int,
                  compiled: bool) -> dict[str, Any]:
    from transformers import StaticCache

    # the factory's model comes with use_cache off (export): generate would recompute every
    # token's prefix at every step (and overrun a static cache)
    model.config.use_cache = model.generation_config.use_cache = True
    ids = torch.tensor(prompts, device=device)
    common = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, use_cache=True)
    bs = len(prompts)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + osl + 8)
    cache_name = cache_arg(model)

    def eager(n: int):
        model.generate(ids, **common, max_new_tokens=n, min_new_tokens=n)

    def static(n: int):
        cache.reset()
        model.generate(ids, **common, max_new_tokens=n, min_new_tokens=n, **{cache_name: cache},
                       disable_compile=not compiled)

    with torch.inference_mode():
        results = {"eager": _measure(eager, bs, osl, num, warmup=1)}
        log.info("HF eager: %s", results["eager"])  # on record before the (long) compiled baseline
        # two warm-up rounds: the first compiles, the second records the CUDA graphs
        results["static_compile"] = {**_measure(static, bs, osl, num, warmup=2), "compiled": compiled}
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m autodeploy.bench.hf_baselines [--model llama3_8b] [--bs 1] ...``: the baselines
    alone (no engine build), on the benchmark's prompts; prints one JSON line."""
    import argparse
    import json

    from autodeploy.config import compose_experiment, experiment
    from autodeploy.models.factory import create_factory

    from .benchmark import random_prompts

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="llama3_8b")
    ap.add_argument("--bs", type=int, default=1)
    ap.add_argument("--isl", type=int, default=1024)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--num", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="static cache without torch.compile")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = experiment(compose_experiment([f"model={args.model}"], check_transforms=False))
    factory = create_factory(cfg.args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = random_prompts(args.bs, args.isl, factory.config.vocab_size)
    result = {"model": args.model, "bs": args.bs, "isl": args.isl, "osl": args.osl,
              **hf_baselines(factory, device, prompts, args.osl, args.num, compile=not args.no_compile)}
    line = json.dumps(result, default=str)
    print("HF_BASELINES", line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
