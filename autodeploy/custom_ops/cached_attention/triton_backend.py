"""``triton`` cached-attention backend: op ``autodeploy::triton_cached_attention``.

Same signature and semantics as the ``torch`` reference backend (docs/architecture.md). The
kernels live in ``triton_kernels.py`` and are imported on first call, so this module (and the
op's fake kernel) load on a machine without triton. The op reads no host value, so it can be
captured in a CUDA graph.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import AttentionBackend, register_backend

OP_NAME = "triton_cached_attention"


SCHEMA = (
    f"{OP_NAME}(Tensor q, Tensor k, Tensor v, Tensor seq_len, Tensor input_pos, Tensor cu_seqlen, "
    "Tensor page_table, Tensor(a!) k_cache, Tensor(b!) v_cache, float scale, int? sliding_window=None, "
    "float? logit_cap=None, Tensor? sinks=None, Tensor? alibi_slopes=None, int? attention_chunk_size=None) -> Tensor"
)


def triton_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_len: torch.Tensor,
    input_pos: torch.Tensor,
    cu_seqlen: torch.Tensor,
    page_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    sliding_window: Optional[int] = None,
    logit_cap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    attention_chunk_size: Optional[int] = None,
) -> torch.Tensor:
    from . import triton_kernels

    return triton_kernels.cached_attention(
        q, k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache, scale, sliding_window, logit_cap,
        sinks, alibi_slopes, attention_chunk_size,
    )


# A plain Library op rather than torch.library.custom_op: the same schema (caches mutated in place),
# less host time per call (every eager prefill step calls it per layer; docs/performance-history.md).
_LIB = torch.library.Library("autodeploy", "FRAGMENT")
_LIB.define(SCHEMA)
for _key in ("CUDA", "CPU"):  # CPU: Triton's interpreter (TRITON_INTERPRET=1), for tests
    _LIB.impl(OP_NAME, triton_cached_attention, _key)


@torch.library.register_fake(f"autodeploy::{OP_NAME}")
def _(q, k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache, scale, sliding_window=None, logit_cap=None,
      sinks=None, alibi_slopes=None, attention_chunk_size=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def check_available() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "attention backend 'triton' needs the triton package (it ships with CUDA builds of "
            "torch; or pip install triton); use backend=torch on CPU"
        ) from None
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "attention backend 'triton' needs a CUDA GPU (TRITON_INTERPRET=1 runs it slowly on CPU "
            "for tests); use backend=torch on CPU"
        )


BACKEND = register_backend(
    AttentionBackend(name="triton", module=__name__, op_name=OP_NAME, check_available=check_available)
)
