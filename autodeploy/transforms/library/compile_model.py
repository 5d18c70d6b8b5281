"""``compile_model`` (stage compile): torch-simple | torch-compile | torch-cudagraph | torch-opt | auto.

The result is called like the GraphModule (same keyword inputs), so the engine does not care
which backend ran. CUDA-graph backends capture decode-only batches (see ``compile/cudagraph.py``
for the padding rules) when the cache manager (``ctx.cache``) already holds its tensors, else on
the first decode step. With those tensors, the first call of a one-compile graph (torch-compile,
torch-opt) is a prefill step, run here before any capture, so that inductor tunes its kernels at
prefill sizes (``compile/__init__.py``). ``auto`` picks torch-opt on CUDA and torch-simple on the
CPU. A run that chooses a CUDA-graph backend for the CPU stops at config time
(``config/preflight.py``); called directly on a CPU device, they fall back to torch-simple with
one warning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import fx

from ...compile import (
    COMPILE_BACKENDS,
    COMPILES,
    check_backend,
    clamp_batch_sizes,
    compile_graph,
    default_batch_sizes,
    placeholder_names,
    resolve_auto,
)
from ...compile.cudagraph import prefill_buckets
from ...compile.inline import inline_for_host
from ...runtime.kv_cache import CacheInterface
from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from .kvcache import run_prompt_forward

log = logging.getLogger(__name__)


@dataclass
class CompileModelConfig(TransformConfig):
    stage: str = "compile"
    backend: str = "auto"  # one of COMPILE_BACKENDS; auto: torch-opt on a GPU, torch-simple on the CPU
    # decode batch sizes to capture; None = 1, 2, 4, multiples of 8 and max_batch_size
    cuda_graph_batch_sizes: Optional[List[int]] = None
    max_batch_size: Optional[int] = None  # None = args.max_batch_size
    capture_on_build: bool = True  # False: capture on the first decode step instead
    num_warmup_iters: int = 2  # eager runs before each capture (compile, autotune, planning)
    # torch-compile/torch-opt (CompiledGraph): "two" = one-token steps compile apart from the rest
    # (token dims backed: kernels as fast as static ones); "one" = one compile for every batch shape
    # (all batch dims unbacked: slower kernels); "dynamic" = dynamic=True, which compiles again for
    # sizes 0/1 of every batch dim (a one-prompt prefill's compile waits for the first request)
    compiles: str = "two"
    # torch-compile/torch-opt with compiles=two: cut the graph at its cache ops and compile every
    # distinct region once (a decoder's layers share one compile); False: the whole graph at once
    regional: bool = True
    # CUDA graphs of this many decode sequences or more are captured with cuBLASLt GEMMs (None: cuBLAS)
    cublaslt_min_batch: Optional[int] = 32
    # torch-cudagraph/torch-opt: steps of one prompt (or chunk) up to this many tokens replay CUDA
    # graphs captured at multiples of 64 tokens, padded (compile/cudagraph.py); 0 = they run eagerly
    cuda_graph_prefill_tokens: int = 1024
    run_graph_cleanup: bool = False  # the result is no longer a plain GraphModule
    requires_clean_graph: bool = True

    def __post_init__(self):  # fail at config time, before any model work
        try:
            check_backend(self.backend)
        except ValueError as e:
            raise ValueError(f"args.transforms.compile_model.backend: {e}") from None
        if self.cuda_graph_batch_sizes is not None and any(int(b) < 1 for b in self.cuda_graph_batch_sizes):
            sizes = list(self.cuda_graph_batch_sizes)
            raise ValueError(f"args.transforms.compile_model.cuda_graph_batch_sizes must be >= 1, got {sizes}")
        if self.cuda_graph_prefill_tokens < 0:
            raise ValueError("args.transforms.compile_model.cuda_graph_prefill_tokens must be >= 0 (0 = off), "
                             f"got {self.cuda_graph_prefill_tokens}")
        if self.compiles not in COMPILES:
            raise ValueError(f"args.transforms.compile_model.compiles must be one of {', '.join(COMPILES)}, "
                             f"got {self.compiles!r}")


def _prepare_hooks(ctx: BuildContext) -> list:
    """The attention backend's ``prepare`` hook (flashinfer plans there), as insert_cached_attention chose it."""
    backend = ctx.shared.get("attention_backend")
    return [backend.prepare] if backend is not None and backend.prepare is not None else []


def _prefill_buckets(cfg: "CompileModelConfig", gm: fx.GraphModule, info, cache) -> list[int]:
    """Token counts of the one-prompt prefill graphs; none below 2 sequences a step (the padding
    is a second sequence), without the cache manager's sizes, or for a graph with the ``moe`` op
    (captured, it runs every expert on every token: a prefill's MLP several times over)."""
    max_seq_len = getattr(cache, "max_seq_len", None)
    if not cfg.cuda_graph_prefill_tokens or info is None or max_seq_len is None or info.max_batch_size < 2:
        return []
    moe_ops = ("autodeploy.moe.default", "autodeploy.fp8_moe.default")
    if any(n.op == "call_function" and str(n.target) in moe_ops for n in gm.graph.nodes):
        log.info("compile_model: the graph has MoE layers: one-prompt prefills run eagerly (no prefill graphs)")
        return []
    return prefill_buckets(cfg.cuda_graph_prefill_tokens, max_seq_len, info.max_num_tokens)


def _example_inputs(ctx: BuildContext, names: list[str]):
    """Decode-batch inputs and cache tensors from the cache manager, if it has allocated them."""
    cache = ctx.cache
    tensors = getattr(cache, "tensors", None)
    info = getattr(cache, "info", None)
    if not tensors or info is None or not hasattr(info, "decode_batch"):
        return None
    example = {**info.decode_batch(1).named_args, **tensors}
    return example if all(n in example for n in names) else None


@dataclass
class _FirstPrefill:
    """``compile_graph``'s ``first_call``: one prompt step (pages allocated, then freed) of
    ``prefill_chunk_size`` tokens, at most ``max_num_tokens``: the prompt tokens of a step while
    others decode, a size most prefill steps have or come near (the benchmarks' prompts: 1024).
    Not ``max_num_tokens`` itself (8192 in the 8B runs): steps that large are rarer, and each
    kernel's autotune would run at 4x the tokens."""

    cache: CacheInterface
    num_tokens: int
    seconds: Optional[float] = None

    @classmethod
    def from_context(cls, ctx: BuildContext) -> Optional["_FirstPrefill"]:
        cache = ctx.cache
        if not isinstance(cache, CacheInterface) or not cache.tensors:  # as for captures at build
            return None
        chunk = ctx.args.prefill_chunk_size  # None: no cap
        return cls(cache, min(cache.max_num_tokens, chunk or cache.max_num_tokens))

    def __call__(self, model) -> None:
        start = time.perf_counter()
        run_prompt_forward(model, self.cache, self.num_tokens)
        if self.cache.device.type == "cuda":
            torch.cuda.synchronize(self.cache.device)
        self.seconds = time.perf_counter() - start
        log.info("compile_model: first call of the compiled graph, a %d-token prefill (compiles it, tunes its "
                 "kernels at prefill sizes): %.1f s", self.num_tokens, self.seconds)


def _shapes_known(gm: fx.GraphModule) -> bool:
    """Fresh ``meta["val"]`` on every node, which the regional cut reads (sizes, token dims)."""
    from ..graph_utils import run_shape_prop

    try:
        run_shape_prop(gm)
    except Exception as e:  # noqa: BLE001 - the whole-graph compile does not need it
        log.warning("compile_model: shape propagation failed (%s: %s); compiling the graph whole",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    return True


@register("compile_model")
class CompileModel(BaseTransform):
    config_class = CompileModelConfig

    def apply(self, model, ctx: BuildContext):
        cfg: CompileModelConfig = self.config
        backend = check_backend(cfg.backend)
        if not isinstance(model, fx.GraphModule):
            raise TypeError(f"compile_model needs the cached fx.GraphModule, got {type(model).__name__}")
        max_bs = cfg.max_batch_size or getattr(ctx.cache, "max_batch_size", None) or ctx.args.max_batch_size
        if max_bs is None:
            raise ValueError("compile_model needs max_batch_size (set args.max_batch_size)")
        sizes = (
            clamp_batch_sizes(cfg.cuda_graph_batch_sizes, int(max_bs))
            if cfg.cuda_graph_batch_sizes is not None
            else default_batch_sizes(int(max_bs))
        )
        names = placeholder_names(model)
        example = _example_inputs(ctx, names) if cfg.capture_on_build else None
        info = getattr(ctx.cache, "info", None)  # SequenceInfo: the engine never builds a larger step
        first_call = _FirstPrefill.from_context(ctx)
        compiles_graph = resolve_auto(backend, ctx.device) in ("torch-compile", "torch-opt")
        regional = cfg.regional and compiles_graph and cfg.compiles == "two" and _shapes_known(model)
        compiled, used = compile_graph(
            model, backend, ctx.device, sizes, example_inputs=example,
            prepare_hooks=_prepare_hooks(ctx), warmup_iters=cfg.num_warmup_iters,
            max_num_tokens=getattr(info, "max_num_tokens", None), max_batch_size=getattr(info, "max_batch_size", None),
            compiles=cfg.compiles, cublaslt_min_batch=cfg.cublaslt_min_batch, first_call=first_call,
            regional=regional, prefill_tokens=_prefill_buckets(cfg, model, info, ctx.cache),
        )
        if used == "torch-simple":
            fell_back = backend not in (used, "auto")
            note = "torch-simple: graph runs as is" + (f" ({backend} needs CUDA)" if fell_back else "")
            host = inline_for_host(compiled) if ctx.device.type == "cpu" else 0
            if host:
                note += f", {host} canonical ops call their host code (CPU)"
            return compiled, TransformInfo(num_matches=0, is_clean=True, note=note)
        note = used
        regions = getattr(getattr(compiled, "model", compiled), "regions", None)  # CompiledGraph, maybe in the runner
        if regions:
            note += f", regional: {regions}"
        if first_call is not None and first_call.seconds is not None:
            note += f", first call a {first_call.num_tokens}-token prefill"
        if used in ("torch-cudagraph", "torch-opt"):
            captured = getattr(compiled, "captured_sizes", [])
            note += f", decode graphs {captured}" if captured else f", decode graphs {sizes} on first decode step"
            prefills = getattr(compiled, "captured_prefill_tokens", [])
            if prefills:
                note += f", one-prompt prefill graphs {prefills[0]}..{prefills[-1]} tokens ({len(prefills)})"
        return compiled, TransformInfo(num_matches=1, is_clean=True, note=note)


__all__ = ["CompileModel", "CompileModelConfig", "COMPILE_BACKENDS"]
