"""One-pass ("persistent") reductions over rows wider than inductor's own limit.

Inductor reduces a row in one pass (a persistent reduction, kernels named ``triton_per_*``) only
up to 1024 elements. A wider row is looped over twice (``triton_red_*``): once for the statistic,
then again to read the row back and write the result. A residual add + RMSNorm over a 4096-wide
hidden state then moves 1.5x the bytes it needs: on an H200, 22.9 us per 2078-token norm of
Llama-3.1-8B where its bytes alone take ~16 us (scripts/perf_probe.py profile, 2026-11-30).

``persistent_reductions(width)`` lets inductor take the one-pass kernel for inner (row-wise)
reductions up to ``width`` elements while the compile_model transform compiles. Inductor's FX
graph cache does not key on this choice, so the cache key gets a tag too (``cache_key_tag``):
a build with another width never reuses these kernels.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

INDUCTOR_WIDTH = 1024  # inductor's own limit for inner reductions


def _wide_rows_choices(width: int):
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WideRows(InductorChoices):
        def should_use_persistent_reduction(self, features, *args, **kwargs):
            cooperative = args[0] if args else kwargs.get("cooperative_reduction", False)
            if (torch._inductor.config.triton.persistent_reductions and not cooperative
                    and features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, width)):
                return True
            return super().should_use_persistent_reduction(features, *args, **kwargs)

    return WideRows()


@contextlib.contextmanager
def persistent_reductions(width: int) -> Iterator[None]:
    """Inductor compiles inside reduce rows of up to ``width`` elements in one pass (``width`` <=
    1024: inductor's own heuristic, nothing changed)."""
    if width <= INDUCTOR_WIDTH:
        yield
        return
    from torch._inductor.virtualized import V

    with contextlib.ExitStack() as stack:
        stack.enter_context(V.set_choices_handler(_wide_rows_choices(width)))
        cconfig = getattr(torch.compiler, "config", None)
        if cconfig is not None and hasattr(cconfig, "cache_key_tag"):
            tag = f"{cconfig.cache_key_tag}+autodeploy-persistent-{width}".lstrip("+")
            stack.enter_context(cconfig.patch(cache_key_tag=tag))
        yield
