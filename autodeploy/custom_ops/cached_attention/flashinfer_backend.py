"""``flashinfer`` cached-attention backend: op ``autodeploy::flashinfer_cached_attention``.

Same signature and semantics as the ``torch`` reference backend. flashinfer is an optional extra
(``pip install autodeploy[gpu]``), imported lazily; ``check_available`` says so when it is missing.

- New K/V go into the pages with the Triton append kernel (one launch, reads the page table on
  the device, so it needs no plan and can be captured).
- Attention runs through flashinfer's wrappers on its CSR page layout (``indptr``/``indices``/
  ``last_page_len``), which ``plan`` builds on the host: a decode-only batch (T == B) takes
  ``BatchDecodeWithPagedKVCacheWrapper``, anything else ``BatchPrefillWithPagedKVCacheWrapper``
  (decode rows of a mixed batch are 1-token requests there).
- Planning: eagerly, the op plans itself once per step and layer configuration (it reads the
  metadata on the host: one sync per step). A step is recognised by the identity and version
  of the metadata tensors, so the layers of one forward share a plan.
- CUDA graphs: flashinfer's graph-mode decode wrapper has a fixed batch size, so there is one per
  (configuration, batch size). ``prepare(inputs)`` (the backend's hook, called by the CUDA-graph
  runner before every capture and replay with the graph's static inputs) plans them; while a
  graph is being captured the op only runs.

Semantics mapping: our window W (key j visible from position p iff p - j < W) is flashinfer's
``window_left = W - 1``; the soft cap (cap * tanh(scale * q.k / cap)) is flashinfer's
``logits_soft_cap``; causal prefill aligns queries to the end of the KV, as ours.

Not supported (the build fails naming the variant, see ``AttentionBackend.variants``): sinks and
chunk-local attention have no argument in the wrappers' documented ``plan``/``run``, and their
ALiBi (``pos_encoding_mode="ALIBI"``) derives the slopes from the number of heads it sees, which is
wrong for our per-head slopes tensor once tensor parallelism splits the heads.
"""

import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from . import AttentionBackend, register_backend

OP_NAME = "flashinfer_cached_attention"
WORKSPACE_BYTES = 256 * 2**20
_MISSING = (
    "attention backend 'flashinfer' needs the flashinfer package: pip install autodeploy[gpu] "
    "(flashinfer-python), or use backend=triton / backend=torch"
)


def _flashinfer():
    try:
        import flashinfer
    except ImportError as e:
        raise RuntimeError(f"{_MISSING} ({e})") from None
    return flashinfer


@dataclass(frozen=True)
class _LayerCfg:
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    page_size: int
    window_left: int
    logits_cap: float
    scale: float
    q_dtype: torch.dtype
    kv_dtype: torch.dtype


def _host_csr(seq_len, input_pos, page_table, page_size):
    """flashinfer's CSR page layout on the host (the only sync of a step)."""
    seq_len, input_pos, table = (t.to("cpu", torch.int32) for t in (seq_len, input_pos, page_table))
    kv_len = input_pos + seq_len
    num_pages = (kv_len + page_size - 1) // page_size
    indptr = torch.zeros(len(kv_len) + 1, dtype=torch.int32)
    indptr[1:] = num_pages.cumsum(0)
    cols = torch.arange(table.shape[1])
    indices = table[cols[None, :] < num_pages[:, None]].to(torch.int32)  # row-major: pages in order
    last_page_len = (kv_len - (num_pages - 1).clamp_min(0) * page_size).to(torch.int32)
    qo_indptr = torch.zeros(len(seq_len) + 1, dtype=torch.int32)
    qo_indptr[1:] = seq_len.cumsum(0)
    return qo_indptr, indptr, indices, last_page_len


class _Planner:
    """The wrappers and their plans (one instance per process)."""

    def __init__(self):
        self.workspace: dict[torch.device, torch.Tensor] = {}
        self.eager: dict[tuple, Any] = {}  # (cfg, is_decode) -> wrapper
        self.eager_step: dict[tuple, tuple] = {}
        self.graph: dict[tuple, Any] = {}  # (cfg, batch) -> cuda-graph decode wrapper
        self.cfgs: set[_LayerCfg] = set()

    def _ws(self, device):
        if device not in self.workspace:
            self.workspace[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return self.workspace[device]

    @staticmethod
    def _step_key(*tensors):
        # identity + version: the same tensors, not written since, mean the same step
        return tuple((weakref.ref(t), t._version) for t in tensors)

    @staticmethod
    def _same_step(old, new) -> bool:
        return old is not None and all(o[0]() is n[0]() and o[1] == n[1] for o, n in zip(old, new))

    def _plan(self, wrapper, cfg: _LayerCfg, is_decode: bool, seq_len, input_pos, page_table):
        qo_indptr, indptr, indices, last = _host_csr(seq_len, input_pos, page_table, cfg.page_size)
        common = dict(window_left=cfg.window_left, logits_soft_cap=cfg.logits_cap or None,
                      sm_scale=cfg.scale, q_data_type=cfg.q_dtype, kv_data_type=cfg.kv_dtype)
        if is_decode:
            wrapper.plan(indptr, indices, last, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.page_size, **common)
        else:
            wrapper.plan(qo_indptr, indptr, indices, last, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.page_size, head_dim_vo=cfg.head_dim_v, causal=True, **common)

    def eager_wrapper(self, cfg: _LayerCfg, is_decode: bool, device, seq_len, input_pos, page_table):
        fi = _flashinfer()
        key = (cfg, is_decode)
        if key not in self.eager:
            cls = fi.BatchDecodeWithPagedKVCacheWrapper if is_decode else fi.BatchPrefillWithPagedKVCacheWrapper
            self.eager[key] = cls(self._ws(device), "NHD")
        step = self._step_key(seq_len, input_pos, page_table)
        if not self._same_step(self.eager_step.get(key), step):
            self._plan(self.eager[key], cfg, is_decode, seq_len, input_pos, page_table)
            self.eager_step[key] = step
        return self.eager[key]

    def graph_wrapper(self, cfg: _LayerCfg, batch: int, max_pages: int, device):
        key = (cfg, batch)
        if key not in self.graph:
            fi = _flashinfer()
            self.graph[key] = fi.BatchDecodeWithPagedKVCacheWrapper(
                self._ws(device), "NHD", use_cuda_graph=True,
                paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buffer=torch.zeros(batch * max_pages, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=device),
            )
        return self.graph[key]

    def prepare(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Plan the graph-mode decode wrappers of every known layer configuration for this batch."""
        seq_len, input_pos, page_table = inputs["seq_len"], inputs["input_pos"], inputs["page_table"]
        if "input_ids" in inputs and inputs["input_ids"].shape[-1] != seq_len.shape[0]:
            return  # not a decode-only batch: nothing is replayed
        for cfg in list(self.cfgs):
            w = self.graph_wrapper(cfg, seq_len.shape[0], page_table.shape[1], page_table.device)
            self._plan(w, cfg, True, seq_len, input_pos, page_table)


PLANNER = _Planner()


@torch.library.custom_op(f"autodeploy::{OP_NAME}", mutates_args=("k_cache", "v_cache"))
def flashinfer_cached_attention(
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
    from .triton_kernels import append_kv

    if sinks is not None or alibi_slopes is not None or attention_chunk_size is not None:
        raise ValueError("flashinfer backend: sinks, ALiBi and chunked attention are not supported; use backend=triton")
    q3, k3, v3 = q[0], k[0], v[0]
    T, H, D = q3.shape
    B = seq_len.shape[0]
    cfg = _LayerCfg(
        num_qo_heads=H, num_kv_heads=k3.shape[1], head_dim=D, head_dim_v=v3.shape[-1],
        page_size=k_cache.shape[1],
        window_left=int(sliding_window) - 1 if sliding_window and sliding_window > 0 else -1,
        logits_cap=float(logit_cap) if logit_cap and logit_cap > 0 else 0.0,
        scale=float(scale), q_dtype=q.dtype, kv_dtype=k_cache.dtype,
    )
    PLANNER.cfgs.add(cfg)
    append_kv(k3, v3, k_cache, v_cache, input_pos, cu_seqlen, page_table)
    is_decode = T == B
    if torch.cuda.is_current_stream_capturing():
        if not is_decode:
            raise RuntimeError("flashinfer backend: only decode-only batches can be captured in a CUDA graph")
        wrapper = PLANNER.graph.get((cfg, B))
        if wrapper is None:
            raise RuntimeError(
                "flashinfer backend: no plan for this CUDA graph; call the backend's prepare(inputs) before "
                "capture and replay (compile_model's CUDA-graph runner does)"
            )
    else:
        wrapper = PLANNER.eager_wrapper(cfg, is_decode, q.device, seq_len, input_pos, page_table)
    out = wrapper.run(q3.contiguous(), (k_cache, v_cache))
    return out.unsqueeze(0)


@flashinfer_cached_attention.register_fake
def _(q, k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache, scale, sliding_window=None, logit_cap=None,
      sinks=None, alibi_slopes=None, attention_chunk_size=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def check_available() -> None:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        raise RuntimeError(_MISSING) from None
    if not torch.cuda.is_available():
        raise RuntimeError("attention backend 'flashinfer' needs a CUDA GPU; use backend=torch on CPU")


BACKEND = register_backend(
    AttentionBackend(
        name="flashinfer", module=__name__, op_name=OP_NAME, check_available=check_available,
        prepare=PLANNER.prepare, variants=frozenset({"sliding_window", "logit_cap"}),
    )
)
