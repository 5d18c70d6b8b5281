"""CUDA graphs for decode-only batches and one-prompt prefill steps, eager for everything else.

A decode-only batch is one where every sequence brings one token: ``T == B`` (input_ids is
``[1, T]``, seq_len is ``[B]``; no sequence brings zero tokens). Such a batch of ``b`` sequences
replays the graph captured for the smallest captured size ``bs >= b``:

- batched inputs (``input_ids``, ``position_ids``, ``input_pos``, ``page_table``, ``slot_idx``)
  are copied into the graph's static buffers, rows ``[0, b)``;
- rows ``[b, bs)`` are padding: token 0 at position 0, one token (``seq_len`` 1), page-table row
  all 0, ``slot_idx`` 0. Page 0 and state slot 0 are scratch in the cache manager (never handed
  to a request), so the padded rows only ever write there. ``seq_len`` (all ones), ``cu_seqlen``
  and ``logits_idx`` (``arange``) are the same for every decode batch and are never copied;
- every other input (the caches) must be the very tensors seen at capture, else the call runs
  eagerly (with one warning);
- outputs are token-major (``[1, T, ...]``): the runner returns views of the graph's static
  output narrowed to the first ``b`` tokens, valid until the next replay.

A step of one sequence with several new tokens (a prompt, or a chunk of one: what TTFT waits for
when few requests run) with ``T`` up to the largest of ``prefill_tokens`` (``prefill_buckets``:
``compile_model.cuda_graph_prefill_tokens``, default 1024) replays the graph captured for
the smallest multiple of ``PREFILL_GRANULE`` tokens ``Tp >= T``: its batch is the real sequence
followed by one padding sequence of the other ``Tp - T`` tokens (at position 0, page-table row
all 0, slot 0: scratch, as above; the rows of its tokens keep whatever ids and positions they
held, which only that sequence reads). Its launches (eagerly, the host's time for an 8B prefill
is on the order of the GPU's: docs/performance-history.md) become one replay; the padding
costs at most ``PREFILL_GRANULE - 1`` tokens of compute. A step that wants every token's logits
(``logits_idx`` longer than 1: prompt logprobs) runs eagerly. Buckets stop below ``max_seq_len``
(the padding sequence's positions must have page-table columns) and need ``max_batch_size`` >= 2.

Other prefill or mixed batches, larger batches, or a page table of another width run eagerly (for
torch-opt: the compiled graph, not FX). Graphs are captured largest first into one shared memory
pool, each after a few warm-up runs (which let attention backends plan; for torch-opt the first
one compiles the graph, once for every capture size and the eager batches: ``CompiledGraph``).
Sizes from ``cublaslt_min_batch`` up are warmed up and captured with cuBLASLt as the preferred
BLAS library (the graph keeps those GEMM kernels; they were faster from 32 tokens up and slower
below: scripts/gemm_check.py, docs/performance-history.md).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

TOKEN_INPUTS = ("input_ids", "position_ids")  # [1, T]
SEQ_INPUTS = ("seq_len", "input_pos", "cu_seqlen", "page_table", "slot_idx")  # [B, ...] (cu_seqlen [B+1])
LOGITS_INPUTS = ("logits_idx",)  # [G]: the rows whose logits a gathering graph computes (G == B in decode)
BATCHED_INPUTS = TOKEN_INPUTS + SEQ_INPUTS + LOGITS_INPUTS
_CONSTANT_IN_DECODE = ("seq_len", "cu_seqlen", "logits_idx")
PREFILL_GRANULE = 64  # one-prompt prefill graphs are captured at multiples of this many tokens


def prefill_buckets(max_tokens: int, max_seq_len: Optional[int], max_num_tokens: Optional[int]) -> list[int]:
    """Token counts of the one-prompt prefill graphs: multiples of ``PREFILL_GRANULE`` up to
    ``max_tokens``, below ``max_seq_len`` and at most ``max_num_tokens``."""
    top = min(max_tokens, max_num_tokens or max_tokens, (max_seq_len or max_tokens + 1) - 1)
    return list(range(PREFILL_GRANULE, top + 1, PREFILL_GRANULE))


def decode_pad_inputs(bs: int, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Static buffers of a decode batch of ``bs`` padding rows (dtypes/devices/page-table width of ``like``)."""
    out = {}
    for name in BATCHED_INPUTS:
        if name not in like:
            continue
        t = like[name]
        if name in TOKEN_INPUTS:
            out[name] = torch.zeros((1, bs), dtype=t.dtype, device=t.device)
        elif name == "seq_len":
            out[name] = torch.ones(bs, dtype=t.dtype, device=t.device)
        elif name == "cu_seqlen":
            out[name] = torch.arange(bs + 1, dtype=t.dtype, device=t.device)
        elif name == "logits_idx":  # each sequence's one token
            out[name] = torch.arange(bs, dtype=t.dtype, device=t.device)
        elif name == "page_table":
            out[name] = torch.zeros((bs, t.shape[1]), dtype=t.dtype, device=t.device)
        else:
            out[name] = torch.zeros(bs, dtype=t.dtype, device=t.device)
    return out


def prefill_pad_inputs(tokens: int, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Static buffers of a ``tokens``-token step of two sequences (the real one, then the padding
    one), laid out as one token then the rest until a replay writes the real split."""
    out = decode_pad_inputs(2, like)
    for name in TOKEN_INPUTS:
        if name in like:
            out[name] = torch.zeros((1, tokens), dtype=like[name].dtype, device=like[name].device)
    if "seq_len" in out:
        out["seq_len"][1] = tokens - 1
    if "cu_seqlen" in out:
        out["cu_seqlen"][2] = tokens
    if "logits_idx" in out:
        out["logits_idx"][1] = tokens - 1  # the padding sequence's last token
    return out


def _rows(name: str, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return t[:, start:stop] if name in TOKEN_INPUTS else t[start:stop]


def _map_tensors(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on every tensor of a graph's outputs (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map_tensors(o, fn) for o in out)
    if isinstance(out, dict):
        return {k: _map_tensors(v, fn) for k, v in out.items()}
    return out


def _narrow_prefill(out: Any, tokens: int, t: int) -> Any:
    """A prefill graph's outputs for the real sequence: rows of dim -2 (``[..., rows, V]``), its
    ``t`` tokens of ``tokens`` (every token's logits) or its 1 of 2 (the last tokens' logits)."""
    def narrow(x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and x.shape[-2] in (tokens, 2):
            return x.narrow(-2, 0, t if x.shape[-2] == tokens else 1)
        return x
    return _map_tensors(out, narrow)


def _narrow_tokens(out: Any, bs: int, b: int) -> Any:
    def narrow(x: torch.Tensor) -> torch.Tensor:
        dim = next((d for d, size in enumerate(x.shape) if size == bs), None)
        return x if dim is None else x.narrow(dim, 0, b)
    return _map_tensors(out, narrow)


class _Graph:
    def __init__(self, bs: int, inputs: dict[str, torch.Tensor], tokens: Optional[int] = None):
        self.bs = bs
        self.tokens = tokens  # a one-prompt prefill graph of this many tokens (None: decode)
        self.inputs = inputs  # every graph input: static batched buffers + the static tensors
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.output: Any = None
        self.pad_from = bs  # rows [pad_from, bs) currently hold padding values


@contextlib.contextmanager
def blas_library(name: Optional[str]):
    """``torch.backends.cuda.preferred_blas_library(name)`` inside the block (None: unchanged). A
    torch built without that library keeps its own, with one warning: the capture goes on."""
    if name is None:
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library(name)
    except RuntimeError as e:
        if name not in _BLAS_REFUSED:
            _BLAS_REFUSED.add(name)
            log.warning("BLAS library %s not available (%s): GEMMs keep %s", name, str(e).splitlines()[0], before)
        yield
        return
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


_BLAS_REFUSED: set[str] = set()
_ONE_ROW = torch.empty(1)  # a step without logits_idx (a graph that does not gather) keeps one row per sequence


class CudaGraphRunner(nn.Module):
    """Callable like the GraphModule (same keyword inputs; extra ones are ignored); see the module
    docstring. ``input_names`` lists the inputs it takes."""

    def __init__(
        self,
        model: nn.Module,
        input_names: Iterable[str],
        batch_sizes: Iterable[int],
        warmup_iters: int = 2,
        prepare_hooks: Iterable[Callable[[Mapping[str, torch.Tensor]], None]] = (),
        cublaslt_min_batch: Optional[int] = None,
        prefill_tokens: Iterable[int] = (),
    ):
        super().__init__()
        self.model = model
        self.cublaslt_min_batch = cublaslt_min_batch
        self.input_names = list(input_names)
        self.batch_sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1})
        self.warmup_iters = warmup_iters
        self.prepare_hooks = list(prepare_hooks)
        self.graphs: dict[int, _Graph] = {}
        self.prefill_tokens = sorted({int(t) for t in prefill_tokens if int(t) >= 2})  # see prefill_buckets
        self.prefill_graphs: dict[int, _Graph] = {}  # tokens -> the one-prompt prefill graph
        self.num_prefill_replays = 0
        self.static_names = [n for n in self.input_names if n not in BATCHED_INPUTS]
        self.batched_names = [n for n in self.input_names if n in BATCHED_INPUTS]
        self.copy_names = [n for n in self.batched_names if n not in _CONSTANT_IN_DECODE]
        self.enabled = "seq_len" in self.input_names and bool(self.batch_sizes)
        self.num_replays = 0
        self.num_eager = 0
        self._warned: set[str] = set()
        if "seq_len" not in self.input_names:
            self._warn("no_seq_len", "model has no seq_len input (no cached ops): CUDA graphs off, running eagerly")

    def _warn(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(self.graphs)

    @property
    def captured_prefill_tokens(self) -> list[int]:
        return sorted(self.prefill_graphs)

    # ---- capture ----

    @torch.no_grad()
    def capture(self, example: Mapping[str, torch.Tensor]) -> None:
        """Capture every batch size. ``example``: any call's inputs (or the cache manager's): the
        static tensors are taken from it, the batched ones only lend dtype, device and width."""
        if not self.enabled or self.graphs:
            return
        missing = [n for n in self.input_names if n not in example]
        if missing:
            raise ValueError(f"CUDA-graph capture needs every graph input; missing {missing}")
        example = {n: example[n] for n in self.input_names}  # what the graph takes (forward drops the rest too)
        static = {n: example[n] for n in self.static_names}
        pool = torch.cuda.graph_pool_handle()
        # prefill graphs hold the most memory: first, so that the others reuse it
        for tokens in sorted(self.prefill_tokens, reverse=True):
            g = _Graph(2, {**prefill_pad_inputs(tokens, example), **static}, tokens=tokens)
            try:
                self._capture(g, pool, None)
            except RuntimeError as e:  # e.g. a cache op that plans prefills on the host (flashinfer)
                torch.cuda.synchronize()
                self.prefill_graphs.clear()
                log.warning("CUDA-graph capture of a %d-token prefill failed (%s); prefill steps run eagerly",
                            tokens, str(e).splitlines()[0])
                pool = torch.cuda.graph_pool_handle()  # the decode graphs in a pool of their own
                break
            self.prefill_graphs[tokens] = g
        for bs in sorted(self.batch_sizes, reverse=True):  # largest first: smaller ones reuse its memory
            g = _Graph(bs, {**decode_pad_inputs(bs, example), **static})
            # the graph keeps the GEMM kernels of the BLAS library chosen while it is captured
            lt = self.cublaslt_min_batch is not None and bs >= self.cublaslt_min_batch
            try:
                self._capture(g, pool, "cublaslt" if lt else None)
            except RuntimeError as e:
                # graph code the pipeline left uncaptured (e.g. an MoE it did not match, which reads
                # its group sizes on the host) cannot be captured: decode runs eagerly, correctly
                torch.cuda.synchronize()
                self.graphs.clear()
                self.prefill_graphs.clear()
                self.enabled = False
                log.warning("CUDA-graph capture failed at batch size %d (%s); decode steps run eagerly", bs,
                            str(e).splitlines()[0])
                return
            self.graphs[bs] = g
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s%s", self.captured_sizes,
                 f" and one-prompt prefills of {PREFILL_GRANULE}..{max(self.prefill_graphs)} tokens"
                 if self.prefill_graphs else "")

    def _capture(self, g: _Graph, pool, blas: Optional[str]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), blas_library(blas):
            for _ in range(self.warmup_iters):
                self._prepare(g.inputs)
                self.model(**g.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self._prepare(g.inputs)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=pool), blas_library(blas):
            g.output = self.model(**g.inputs)

    def _prepare(self, inputs: Mapping[str, torch.Tensor]) -> None:
        for hook in self.prepare_hooks:
            hook(inputs)

    # ---- run ----

    def _pick(self, kwargs: Mapping[str, torch.Tensor]) -> Optional[_Graph]:
        b = kwargs["seq_len"].shape[0]
        t = kwargs["input_ids"].shape[-1]
        if t != b:  # prefill or mixed: a graph for one prompt's step, if one is big enough
            if b != 1 or not self.prefill_graphs or kwargs.get("logits_idx", _ONE_ROW).shape[0] != 1:
                return None
            g = next((self.prefill_graphs[n] for n in self.captured_prefill_tokens if n >= t), None)
            return g if g is not None and self._same_static(kwargs, g) else None
        if not self.graphs:
            try:
                self.capture(kwargs)
            except Exception as e:  # noqa: BLE001 - e.g. an op that syncs the host cannot be captured
                self.enabled = False
                torch.cuda.synchronize()
                self._warn("capture", "CUDA-graph capture failed, running eagerly from now on: %s: %s",
                           type(e).__name__, e)
                return None
        g = next((self.graphs[bs] for bs in self.captured_sizes if bs >= b), None)
        if g is None:
            self._warn(f"size{b}", "decode batch of %d is larger than every captured size %s: running eagerly",
                       b, self.captured_sizes)
            return None
        return g if self._same_static(kwargs, g) else None

    def _same_static(self, kwargs: Mapping[str, torch.Tensor], g: _Graph) -> bool:
        pt = kwargs.get("page_table")
        if pt is not None and pt.shape[1] != g.inputs["page_table"].shape[1]:
            self._warn("pt", "page table width changed since capture: running eagerly")
            return False
        for n in self.static_names:
            t, s = kwargs[n], g.inputs[n]
            if t is not s and (t.data_ptr() != s.data_ptr() or t.shape != s.shape):
                self._warn("static", "input %r is not the tensor seen at capture (re-allocated cache?): "
                           "running eagerly", n)
                return False
        return True

    def forward(self, **kwargs):
        kwargs = {n: kwargs[n] for n in self.input_names}  # extra inputs are ignored, like CompiledGraph
        g = self._pick(kwargs) if self.enabled else None
        if g is None:
            self.num_eager += 1
            return self.model(**kwargs)
        if g.tokens is not None:
            return self._replay_prefill(g, kwargs)
        b = kwargs["seq_len"].shape[0]
        inp = g.inputs
        dst = [_rows(n, inp[n], 0, b) for n in self.copy_names]
        src = [kwargs[n] for n in self.copy_names]
        torch._foreach_copy_(dst, src)
        if b < g.pad_from:  # rows [b, pad_from) hold a previous batch's data: pad them again
            torch._foreach_zero_([_rows(n, inp[n], b, g.pad_from) for n in self.copy_names])
        g.pad_from = b
        self._prepare(inp)
        g.graph.replay()
        self.num_replays += 1
        return _narrow_tokens(g.output, g.bs, b)

    def _replay_prefill(self, g: _Graph, kwargs: Mapping[str, torch.Tensor]):
        """The one sequence's rows in front, the padding sequence gets the other tokens."""
        t, inp = kwargs["input_ids"].shape[-1], g.inputs
        names = self.batched_names
        # cu_seqlen [0, t]: the padding starts at t; logits_idx [t - 1]: the real sequence's last token
        dst = [inp[n][:, :t] if n in TOKEN_INPUTS else inp[n][:2] if n == "cu_seqlen" else inp[n][:1] for n in names]
        torch._foreach_copy_(dst, [kwargs[n] for n in names])
        if "seq_len" in inp:
            inp["seq_len"][1:].fill_(g.tokens - t)
        self._prepare(inp)
        g.graph.replay()
        self.num_prefill_replays += 1
        return _narrow_prefill(g.output, g.tokens, t)
