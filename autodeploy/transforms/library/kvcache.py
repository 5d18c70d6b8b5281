"""cache_init stage: cached attention/SSM ops over the runtime's caches, then cache allocation.

Run in this order (YAML order within the stage):
- ``insert_cached_attention``: every canonical ``autodeploy::attention`` becomes the chosen
  backend's cached op; the batch metadata (``seq_len, input_pos, cu_seqlen, page_table,
  slot_idx``) and one K and one V cache per layer become graph inputs (docs/architecture.md).
- ``insert_cached_ssm``: the same for Mamba blocks (conv + SSM state per sequence slot; Mamba2
  ``ssm_scan`` and Mamba1 ``selective_scan``).
- ``initialize_cache``: allocate every registered cache.
- ``resize_kv_cache``: on GPU, grow the paged caches into free memory measured after a
  max-token forward (times ``free_mem_ratio``); on CPU the initial size already holds
  ``max_batch_size`` sequences of ``max_seq_len``.

The cache interface (``ctx.cache``, ``runtime.kv_cache.CacheInterface``) is created from
``args`` here if the caller did not create it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from ...runtime.kv_cache import CacheInterface, CacheSpec
from ...runtime.sequence_info import METADATA_NAMES
from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_dtype_options(config: TransformConfig, transform: str, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value != "auto" and value not in _DTYPES:
            raise ValueError(
                f"args.transforms.{transform}.{name} must be auto, {', '.join(_DTYPES)} or null, got {value!r}"
            )


def ensure_cache(ctx: BuildContext) -> CacheInterface:
    if ctx.cache is None:
        ctx.cache = CacheInterface.from_args(ctx.args, ctx.device)
    return ctx.cache


# ---- graph surgery shared by the insert_cached_* transforms ----


def _placeholders(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}


def as_plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's calling convention: the cached graph takes its inputs by name.

    ``ep.module()`` flattens inputs with a pytree spec, checks the ``[B, S]`` input shapes in a
    ``_guards_fn`` call and a forward pre-hook; the flattened batch replaces that layout. A fresh
    GraphModule over the same graph keeps the parameters and drops the hooks.
    """
    if type(gm.graph._codegen) is fx.graph.CodeGen and not gm._forward_pre_hooks:
        return gm
    gm.graph._codegen = fx.graph.CodeGen()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            gm.graph.erase_node(node)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        output.args = (result[0],)  # the single logits tensor, as before flattening
    return fx.GraphModule(gm, gm.graph)


def _fake(gm: fx.GraphModule, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """A fake tensor (in the graph's fake mode) for a new placeholder's ``meta["val"]``."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)]) or FakeTensorMode()
    with mode:
        return torch.empty(shape, dtype=dtype, device=device)


def add_input(gm: fx.GraphModule, name: str, example: Any) -> fx.Node:
    """Append a placeholder ``name`` after the existing ones (or return it if present)."""
    existing = _placeholders(gm)
    if name in existing:
        return existing[name]
    last = list(existing.values())[-1] if existing else None
    if last is None:
        ctx_mgr = gm.graph.inserting_before(next(iter(gm.graph.nodes), None))
    else:
        ctx_mgr = gm.graph.inserting_after(last)
    with ctx_mgr:
        node = gm.graph.placeholder(name)
    node.meta["val"] = example
    return node


def add_metadata_inputs(gm: fx.GraphModule, cache: CacheInterface) -> dict[str, fx.Node]:
    """The flattened-batch metadata inputs (idempotent); example values use the max batch size."""
    missing = [n for n in ("input_ids", "position_ids") if n not in _placeholders(gm)]
    if missing:
        raise ValueError(f"the graph has no input(s) {missing}; expected forward(input_ids, position_ids)")
    token_index_as_positions(gm)
    B, P = cache.max_batch_size, cache.pages_per_seq
    shapes = {"seq_len": (B,), "input_pos": (B,), "cu_seqlen": (B + 1,), "page_table": (B, P), "slot_idx": (B,)}
    return {
        name: add_input(gm, name, _fake(gm, shapes[name], torch.int32, cache.device)) for name in METADATA_NAMES
    }


def token_index_as_positions(gm: fx.GraphModule) -> int:
    """Replace ``arange(S)`` over the sequence by ``position_ids[0]``; returns how many.

    HF computes the tokens' cache positions as ``arange(S) + past`` (past = 0 at export), e.g.
    Llama-4's attention temperature. In the flattened batch the index along the sequence runs over
    every sequence of the step, while ``position_ids`` holds each token's cache position.
    """
    inputs = _placeholders(gm)
    ids, positions = inputs.get("input_ids"), inputs.get("position_ids")
    size = ids.meta.get("val").shape[1] if ids is not None and isinstance(ids.meta.get("val"), torch.Tensor) else None
    if positions is None or not isinstance(size, torch.SymInt):
        return 0
    num = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.kwargs.get("dtype") not in (None, torch.int64):
            continue
        if node.target is torch.ops.aten.arange.default and len(node.args) == 1:
            end = node.args[0]
        elif node.target is torch.ops.aten.arange.start and len(node.args) == 2 and node.args[0] == 0:
            end = node.args[1]
        else:
            continue
        end_val = end.meta.get("val") if isinstance(end, fx.Node) else None
        if not isinstance(end_val, torch.SymInt) or end_val.node.expr != size.node.expr:
            continue
        with gm.graph.inserting_before(node):
            first_row = gm.graph.call_function(torch.ops.aten.select.int, (positions, 0, 0))
        first_row.meta["val"] = node.meta.get("val")  # [S] int64, like the arange
        node.replace_all_uses_with(first_row)
        gm.graph.erase_node(node)
        num += 1
    return num


def add_cache_input(gm: fx.GraphModule, cache: CacheInterface, spec: CacheSpec) -> fx.Node:
    cache.add_cache(spec)
    count = cache.num_pages if spec.paged else cache.num_slots
    return add_input(gm, spec.name, _fake(gm, (count, *spec.entry_shape), spec.dtype, cache.device))


def _replace(gm: fx.GraphModule, node: fx.Node, target, args: tuple) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _node_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an op call by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _cache_dtype(setting: Optional[str], args: Any, like: torch.dtype) -> torch.dtype:
    name = setting or args.kv_cache_dtype
    if name == "auto":
        return like
    if name not in _DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r} (auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def _val(node: Any) -> torch.Tensor:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{node} has no shape information (meta['val']); run shape propagation first")
    return v


# ---- insert_cached_attention ----


@dataclass
class InsertCachedAttentionConfig(TransformConfig):
    stage: str = "cache_init"
    backend: str = "torch"  # torch | triton | flashinfer (shortcut: args.attn_backend)
    cache_dtype: Optional[str] = None  # None = args.kv_cache_dtype; "auto" = the K projection's dtype
    requires_shape_prop: bool = True

    def __post_init__(self):
        from ...custom_ops.cached_attention import check_name

        _check_dtype_options(self, "insert_cached_attention", "cache_dtype")
        try:
            check_name(self.backend)
        except ValueError as e:
            raise ValueError(f"backend={self.backend} (args.attn_backend): {e}") from None


@register("insert_cached_attention")
class InsertCachedAttention(BaseTransform):
    config_class = InsertCachedAttentionConfig

    def apply(self, gm: fx.GraphModule, ctx: BuildContext):
        from ...custom_ops.cached_attention import ATTENTION_VARIANTS, get_backend

        cfg: InsertCachedAttentionConfig = self.config
        backend = get_backend(cfg.backend)
        cached_op = backend.op()  # fails early, naming a missing extra
        ctx.shared["attention_backend"] = backend  # compile_model runs its prepare hook (flashinfer plans)
        source = _canonical_attention_op()
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is source]
        if not nodes:
            return gm, TransformInfo(num_matches=0, note="no canonical attention in the graph")
        cache = ensure_cache(ctx)
        gm = as_plain_graph_module(gm)
        meta = add_metadata_inputs(gm, cache)
        for layer, node in enumerate(nodes):
            a = _node_args(node)
            k, v = _val(a["k"]), _val(a["v"])
            dtype = _cache_dtype(cfg.cache_dtype, ctx.args, k.dtype)
            caches = [
                add_cache_input(gm, cache, CacheSpec(f"{kind}_cache_{layer}", (cache.page_size, *t.shape[2:]), dtype, True))
                for kind, t in (("k", k), ("v", v))
            ]
            backend.check_features(node.name, {name: a.get(name) for name in ATTENTION_VARIANTS})
            args = (a["q"], a["k"], a["v"], meta["seq_len"], meta["input_pos"], meta["cu_seqlen"],
                    meta["page_table"], *caches, a["scale"], *(a.get(name) for name in ATTENTION_VARIANTS))
            _replace(gm, node, cached_op, args)
        gm.recompile()
        note = f"{cfg.backend} backend, {len(nodes)} layers, pages of {cache.page_size} tokens"
        return gm, TransformInfo(num_matches=len(nodes), is_clean=False, has_valid_shapes=True, note=note)


def _canonical_attention_op():
    import importlib

    importlib.import_module("autodeploy.custom_ops.attention")
    return torch.ops.autodeploy.attention.default


# ---- insert_cached_ssm ----


@dataclass
class InsertCachedSSMConfig(TransformConfig):
    stage: str = "cache_init"
    conv_state_dtype: Optional[str] = None  # None = the conv input's dtype
    ssm_state_dtype: Optional[str] = "float32"  # the recurrent state accumulates over every token
    requires_shape_prop: bool = True

    def __post_init__(self):
        _check_dtype_options(self, "insert_cached_ssm", "conv_state_dtype", "ssm_state_dtype")


@register("insert_cached_ssm")
class InsertCachedSSM(BaseTransform):
    """``causal_conv1d`` / ``ssm_scan`` / ``selective_scan`` -> cached ops over per-slot conv and SSM state."""

    config_class = InsertCachedSSMConfig

    def apply(self, gm: fx.GraphModule, ctx: BuildContext):
        import importlib

        importlib.import_module("autodeploy.custom_ops.ssm_cached")
        ops = torch.ops.autodeploy
        conv_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.causal_conv1d.default]
        scans = (ops.ssm_scan.default, ops.selective_scan.default)
        scan_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in scans]
        if not conv_nodes and not scan_nodes:
            return gm, TransformInfo(num_matches=0, note="no SSM ops in the graph")
        cfg: InsertCachedSSMConfig = self.config
        cache = ensure_cache(ctx)
        gm = as_plain_graph_module(gm)
        meta = add_metadata_inputs(gm, cache)
        batch_meta = (meta["seq_len"], meta["input_pos"], meta["cu_seqlen"], meta["slot_idx"])
        for layer, node in enumerate(conv_nodes):
            a = _node_args(node)
            x, weight = _val(a["x"]), _val(a["weight"])
            dtype = _DTYPES.get(cfg.conv_state_dtype, x.dtype)
            spec = CacheSpec(f"conv_state_{layer}", (weight.shape[0], weight.shape[1] - 1), dtype, paged=False)
            state = add_cache_input(gm, cache, spec)
            args = (a["x"], a["weight"], a.get("bias"), a.get("activation"), *batch_meta, state)
            _replace(gm, node, ops.cached_causal_conv1d.default, args)
        for layer, node in enumerate(scan_nodes):
            a = _node_args(node)
            x, b = _val(a["x"]), _val(a["B"])
            dtype = _DTYPES.get(cfg.ssm_state_dtype, x.dtype)
            if node.target is ops.selective_scan.default:  # Mamba1: a state row per channel
                spec = CacheSpec(f"ssm_state_{layer}", (x.shape[2], b.shape[2]), dtype, paged=False)
                args = (a["x"], a["dt"], a["A"], a["B"], a["C"], a.get("D"), a.get("dt_bias"), a["dt_softplus"])
                cached = ops.cached_selective_scan.default
            else:  # Mamba2: a [head_dim, state] matrix per head
                spec = CacheSpec(f"ssm_state_{layer}", (x.shape[2], x.shape[3], b.shape[3]), dtype, paged=False)
                args = (a["x"], a["dt"], a["A"], a["B"], a["C"], a.get("D"), a.get("dt_bias"), a["dt_min"],
                        a["dt_max"], a["chunk_size"], a.get("dt_softplus", True))
                cached = ops.cached_ssm_scan.default
            _replace(gm, node, cached, (*args, *batch_meta, add_cache_input(gm, cache, spec)))
        gm.recompile()
        note = f"{len(conv_nodes)} conv + {len(scan_nodes)} scan ops, {cache.num_slots} state slots"
        return gm, TransformInfo(num_matches=len(conv_nodes) + len(scan_nodes), has_valid_shapes=True, note=note)


# ---- checks shared by initialize_cache and resize_kv_cache ----

# ops that mix tokens along the sequence: in a flattened batch they would mix sequences
_UNCACHED = {
    "attention": "insert_cached_attention",
    "causal_conv1d": "insert_cached_ssm",
    "ssm_scan": "insert_cached_ssm",
    "selective_scan": "insert_cached_ssm",
    "last_tokens": "insert_cached_last_tokens",
}


def check_fully_cached(gm: Any) -> None:
    """Fail if a sequence-mixing op was left uncached (it would silently mix sequences)."""
    if not isinstance(gm, fx.GraphModule):
        return
    left: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if name.startswith("autodeploy.") and name.split(".")[1] in _UNCACHED:
            left[name.split(".")[1]] = left.get(name.split(".")[1], 0) + 1
        elif "scaled_dot_product_attention" in name or name.startswith("autodeploy.sdpa."):
            left["scaled_dot_product_attention"] = left.get("scaled_dot_product_attention", 0) + 1
        elif node.target in (torch.ops.aten.conv1d.default, torch.ops.aten.convolution.default):
            left["convolution"] = left.get("convolution", 0) + 1
    if not left:
        # the softmax of each unmatched attention first: it names the layer best
        mixing = sorted(token_mixing_nodes(gm), key=lambda n: "softmax" not in str(n.target))
        if mixing:
            shown = "; ".join(_describe(n) for n in mixing[:3]) + (f"; ... ({len(mixing)} nodes)" if len(mixing) > 3 else "")
            raise RuntimeError(
                f"the cached graph still mixes tokens in plain graph code ({shown}): e.g. an attention the pattern "
                "matcher did not rewrite into autodeploy::attention (see match_attention_pattern's note for why); "
                "over the flattened batch, without a KV cache, it would give wrong tokens, so the build stops"
            )
        return
    fixes = sorted({_UNCACHED[op] for op in left if op in _UNCACHED})
    hints = [f"add {', '.join(fixes)} (stage cache_init) to args.transforms"] if fixes else []
    if "scaled_dot_product_attention" in left:
        hints.append("the attention pattern matcher did not rewrite this attention into autodeploy::attention")
    if "convolution" in left:  # e.g. a short conv over the sequence: no per-sequence state in a flattened batch
        hints.append("a convolution is plain graph code (no export patch made it autodeploy::causal_conv1d)")
    found = ", ".join(f"{n} x {op}" for op, n in sorted(left.items()))
    raise RuntimeError(f"the cached graph still has uncached sequence ops ({found}); {'; '.join(hints)}")


# scans along a dim: over the sequence they carry state from token to token
_SCANS = (torch.ops.aten.cumsum.default, torch.ops.aten.cumprod.default, torch.ops.aten.logcumsumexp.default,
          torch.ops.aten.diff.default)


def token_mixing_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Graph code that mixes tokens along the sequence: values spanning it in two dims
    (``[.., S, S']``: attention scores or probs) and scans along it (cumsum, ...).

    Unmatched attention or recurrences stay such graph code; over the cached runtime's flattened
    batch they would see one step's tokens only, and mix sequences. Sizes come from the export's
    symbol for ``seq``.
    """
    ids = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "input_ids"), None)
    ids_val = ids.meta.get("val") if ids is not None else None
    if not isinstance(ids_val, torch.Tensor) or ids_val.dim() != 2 or not isinstance(ids_val.shape[1], torch.SymInt):
        return []
    seq = ids_val.shape[1].node.expr.free_symbols

    def spans(size: Any) -> bool:
        return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols & seq)

    out = []
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if node.op != "call_function" or not isinstance(v, torch.Tensor):
            continue
        if sum(map(spans, v.shape)) >= 2:
            out.append(node)
        elif node.target in _SCANS and isinstance(x := node.args[0].meta.get("val"), torch.Tensor):
            dim_index = 2 if node.target is torch.ops.aten.diff.default else 1  # diff(input, n, dim, ...)
            dim = node.args[dim_index] if len(node.args) > dim_index else node.kwargs.get("dim", -1)
            if spans(x.shape[dim]):
                out.append(node)
    return out


def _describe(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    where = f" in {list(stack.values())[-1][0]}" if stack else ""
    return f"{node.name} = {node.target}{tuple(node.meta['val'].shape)}{where}"


# ---- initialize_cache ----


@dataclass
class InitializeCacheConfig(TransformConfig):
    stage: str = "cache_init"


@register("initialize_cache")
class InitializeCache(BaseTransform):
    config_class = InitializeCacheConfig

    def apply(self, gm, ctx: BuildContext):
        check_fully_cached(gm)
        cache = ensure_cache(ctx)
        if not cache.specs:
            return gm, TransformInfo(num_matches=0, note="no caches registered")
        cache.initialize()
        # the graph itself is unchanged: keep its clean/shape state
        return gm, TransformInfo(num_matches=len(cache.tensors), is_clean=True, has_valid_shapes=True, note=repr(cache))


# ---- resize_kv_cache ----


@dataclass
class ResizeKVCacheConfig(TransformConfig):
    stage: str = "cache_init"
    # share of the GPU memory still free after a max-token forward that goes to the KV cache
    free_mem_ratio: float = 0.8

    def __post_init__(self):
        if not 0.0 <= float(self.free_mem_ratio) < 1.0:
            raise ValueError(f"args.transforms.resize_kv_cache.free_mem_ratio must be in [0, 1), got {self.free_mem_ratio}")


@register("resize_kv_cache")
class ResizeKVCache(BaseTransform):
    config_class = ResizeKVCacheConfig

    def apply(self, gm, ctx: BuildContext):
        check_fully_cached(gm)
        cache = ensure_cache(ctx)
        if cache.specs and not cache.tensors:
            cache.initialize()
        keep = dict(num_matches=0, is_clean=True, has_valid_shapes=True)
        if not any(s.paged for s in cache.specs.values()):
            return gm, TransformInfo(**keep, note="no paged caches")
        if cache.device.type != "cuda":
            return gm, TransformInfo(**keep, note=f"{cache.device.type}: sized for max_batch_size x max_seq_len ({cache})")
        ratio = float(self.config.free_mem_ratio)
        if ratio == 0:
            return gm, TransformInfo(**keep, note=f"free_mem_ratio=0: kept {cache}")
        num_pages = pages_from_free_memory(gm, cache, ratio)
        cache.resize(num_pages)
        log.info("KV cache resized to %s", cache)
        return gm, TransformInfo(**keep, note=f"free_mem_ratio={ratio}: {cache}")


def pages_from_free_memory(gm, cache: CacheInterface, ratio: float) -> int:
    """Pages that fit in ``ratio`` of the memory left free after a max-token forward (min over ranks)."""
    device = cache.device
    run_prompt_forward(gm, cache)
    torch.cuda.synchronize(device)
    # the forward's activations stay reserved in the caching allocator, so "free" already
    # leaves room for the largest batch the engine will run
    free, _ = torch.cuda.mem_get_info(device)
    num_pages = pages_for_budget(cache, free, ratio)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([num_pages], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        num_pages = int(t.item())
    return num_pages


def pages_for_budget(cache: CacheInterface, free_bytes: int, ratio: float) -> int:
    """The current paged caches plus ``ratio`` of ``free_bytes``, capped at what can ever be used."""
    paged_bytes = cache.bytes_per_page * cache.num_pages
    num_pages = int((paged_bytes + free_bytes * ratio) // cache.bytes_per_page)
    useful = cache.max_batch_size * cache.pages_per_seq + 1  # no prefix sharing: more is never used
    if num_pages < cache.pages_per_seq + 1:
        raise RuntimeError(
            f"not enough GPU memory for the KV cache: {free_bytes / 2**30:.2f} GiB free after a "
            f"{cache.max_num_tokens}-token forward gives {num_pages} pages of {cache.page_size} tokens, "
            f"one max_seq_len={cache.max_seq_len} sequence needs {cache.pages_per_seq + 1}; "
            f"lower max_seq_len/max_num_tokens or raise free_mem_ratio"
        )
    return min(num_pages, useful)


def run_prompt_forward(gm, cache: CacheInterface, num_tokens: Optional[int] = None) -> None:
    """One forward over ``num_tokens`` (None: ``max_num_tokens``) prompt tokens, sequences of at
    most ``max_seq_len``. Its pages are freed after, in the order that restores the free list."""
    lengths, left = [], min(num_tokens or cache.max_num_tokens, cache.max_num_tokens)
    while left > 0 and len(lengths) < cache.max_batch_size:
        lengths.append(min(left, cache.max_seq_len))
        left -= lengths[-1]
    pages = [cache.allocate_pages(math.ceil(n / cache.page_size)) for n in lengths]
    try:
        inputs = cache.info.build([[0] * n for n in lengths], [0] * len(lengths), pages, [0] * len(lengths))
        names = {n.target for n in gm.graph.nodes if n.op == "placeholder"} if isinstance(gm, fx.GraphModule) else None
        args = {k: v for k, v in {**inputs.named_args, **cache.tensors}.items() if names is None or k in names}
        with torch.inference_mode():
            gm(**args)
    finally:
        for p in reversed(pages):  # last allocated, first freed: the next request gets page 1 again
            cache.free_pages(p)
