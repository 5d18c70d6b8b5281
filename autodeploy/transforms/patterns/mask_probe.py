"""Decide what the additive terms of attention scores mean, by running them on probe inputs.

HF builds the causal mask from ``position_ids`` inside the graph (packed-sequence detection,
sliding-window or chunk overlay, bool or additive float masks) and some models add a position
bias (ALiBi). Instead of recognizing each way of writing them, the subgraph of every term
(the mask, a bias) is evaluated on concrete probe inputs (several batch and sequence sizes,
shifted positions), the terms are summed, and the result is compared with what
``autodeploy::attention`` can express:

- the allowed (query, key) pattern: causal, sliding window W or chunk-local C; the same for
  every head;
- the values on allowed pairs: zero, a constant per query row (softmax does not see it, unless
  the attention has sinks), or ALiBi ``slope_h * j`` (+ a row constant), whose per-head slopes
  must be held by a tensor in the graph (the op takes them as an argument, so that tensor
  parallelism can slice them with the heads).

Anything else (padding from token values, a learned or relative bias, a pattern that differs
between heads) is refused with the reason, and the attention stays as it is.

Window and chunk sizes come from integer literals of the subgraph and from the model config;
each candidate n is probed at sequence lengths around n (n + 1 separates "window n", "chunk n"
and causal), and with positions shifted to cross n (so a chunk mask computed from
``position_ids`` shows itself even when n is beyond ``max_probe_len``). At run time positions
are cache positions (0 at a sequence's first token), so a chunk may be computed from positions
or from token indices alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional

import torch
from torch import fx
from torch.fx.node import map_arg

from ..graph_utils import get_attr_value
from .nodes import is_op


aten = torch.ops.aten

# int literals of these ops inside a mask subgraph are window/chunk-size candidates
_ARITH_AND_COMPARE = (
    aten.sub.Tensor, aten.sub.Scalar, aten.add.Tensor, aten.add.Scalar, aten.rsub.Scalar,
    aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.eq.Scalar, aten.ne.Scalar, aten.remainder.Scalar,
    aten.floor_divide.default, aten.div.Tensor_mode,
)
_BASE_PROBE_LENS = (1, 2, 5, 16)
_SHIFTED_PROBE_LEN = 6  # positions n-3 .. n+2 cross a chunk boundary at n
_ALL_HEADS_MAX_LEN = 512  # longer probes check a few heads (memory: batch x heads x S x S)
_ALIBI_RTOL = 1e-5  # at least; a bias in bf16/fp16 is ALiBi up to its own rounding


class BiasTerm(NamedTuple):
    node: fx.Node
    # the term is [B*H | 1, S|1, S] (batched-matmul attention, e.g. BLOOM's baddbmm) rather than 4-D
    flat_heads: bool = False


@dataclass
class MaskVerdict:
    ok: bool  # the terms are causal, optionally windowed or chunked, optionally ALiBi
    sliding_window: Optional[int] = None
    chunk_size: Optional[int] = None
    alibi_slopes: Optional[fx.Node] = None  # a graph node whose value holds the [H] slopes
    reason: str = ""


class _NotProbeable(Exception):
    pass


def _subgraph(outputs: list[fx.Node]) -> tuple[list[fx.Node], set[fx.Node]]:
    """The terms' subgraph (stopping at shape queries of other tensors) and its placeholders."""
    nodes: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        if node.op == "call_module":
            raise _NotProbeable(f"mask depends on submodule call {node.target}")
        if is_op(node, aten.sym_size.int) and node.args[0].op != "placeholder":
            continue  # a size of an activation: evaluated from its symbolic expression
        stack.extend(node.all_input_nodes)
    placeholders = {n for n in nodes if n.op == "placeholder"}
    for node in placeholders:
        # positions may shape the mask; other inputs (token ids) only through their sizes, so a
        # padding mask derived from token values is never mistaken for a causal one
        by_value = [u for u in node.users if u in nodes and not is_op(u, aten.sym_size.int)]
        if by_value and not _is_positions(node):
            raise _NotProbeable(f"mask depends on the values of input {node.name} (padding?)")
    order = {n: i for i, n in enumerate(outputs[0].graph.nodes)}
    return sorted(nodes, key=order.__getitem__), placeholders


def _is_positions(node: fx.Node) -> bool:
    return "position" in node.name


def _window_literals(nodes: Iterable[fx.Node]) -> set[int]:
    out = set()
    for node in nodes:
        if node.op == "call_function" and is_op(node, _ARITH_AND_COMPARE):
            for a in node.args:
                if isinstance(a, int) and not isinstance(a, bool) and a >= 2:
                    out.add(a)
    return out


def _on_cpu(x: Any) -> Any:
    if isinstance(x, torch.device):
        return torch.device("cpu")
    if isinstance(x, (list, tuple)):
        return type(x)(_on_cpu(y) for y in x)
    return x


def _probe_inputs(placeholders: list[fx.Node], positions: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
    inputs = {}
    batch, seq = positions.shape
    for node in placeholders:
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.dtype.is_floating_point:
            raise _NotProbeable(f"mask depends on input {node.name} that is not a [batch, seq] integer tensor")
        if _is_positions(node):
            inputs[node] = positions.to(v.dtype)
        else:  # token ids: arbitrary non-special values
            inputs[node] = (torch.arange(batch * seq).reshape(batch, seq) % 7 + 5).to(v.dtype)
    return inputs


def _symbol_values(all_placeholders: list[fx.Node], inputs: dict[fx.Node, torch.Tensor], batch: int, seq: int):
    """Map the export's size symbols to probe sizes (via the graph inputs' symbolic shapes)."""
    values = {}
    for node in all_placeholders:
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        concrete = inputs[node].shape if node in inputs else (batch, seq) if v.dim() == 2 else None
        if concrete is None:
            continue
        for size, c in zip(v.shape, concrete):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                values[size.node.expr] = c
    return values


def _evaluate(nodes: list[fx.Node], gm: fx.GraphModule, inputs, symbols) -> dict[fx.Node, Any]:
    env: dict[fx.Node, Any] = {}
    for node in nodes:
        if node.op == "placeholder":
            env[node] = inputs[node]
        elif node.op == "get_attr":
            t = get_attr_value(gm, node.target)
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                raise _NotProbeable(f"mask depends on parameter/buffer {node.target} that has no data (meta)")
            env[node] = t.to("cpu")
        elif is_op(node, aten.sym_size.int) and node.args[0].op != "placeholder":
            expr = node.meta["val"].node.expr.subs(symbols)
            if not expr.is_Integer:
                raise _NotProbeable(f"cannot evaluate size {node.name} = {expr}")
            env[node] = int(expr)
        elif node.op == "call_function":
            args = _on_cpu(map_arg(node.args, env.__getitem__))
            kwargs = {k: _on_cpu(v) for k, v in map_arg(node.kwargs, env.__getitem__).items()}
            env[node] = node.target(*args, **kwargs)
        else:
            raise _NotProbeable(f"mask depends on {node.op} node {node.name}")
    return env


def _as_4d(t: Any, term: BiasTerm, batch: int, heads: Optional[int], seq: int) -> torch.Tensor:
    """A term's probe value as an additive ``[B|1, H|1, S|1, S]`` tensor (bool: True = allowed)."""
    if not isinstance(t, torch.Tensor):
        raise _NotProbeable(f"term {term.node.name} is not a tensor")
    if t.dtype == torch.bool:
        t = torch.zeros((), dtype=torch.float32).masked_fill(~t, float("-inf"))
    elif not t.dtype.is_floating_point:
        raise _NotProbeable(f"mask of dtype {t.dtype}")
    if term.flat_heads:
        if t.dim() != 3 or heads is None or t.shape[0] not in (1, batch * heads):
            raise _NotProbeable(f"batched-matmul term {term.node.name} of shape {tuple(t.shape)} is not [B*H|1, S|1, S]")
        t = t.view(1 if t.shape[0] == 1 else batch, 1 if t.shape[0] == 1 else heads, *t.shape[1:])
    while t.dim() < 4:
        t = t.unsqueeze(0)
    ok = (t.dim() == 4 and t.shape[0] in (1, batch) and t.shape[2] in (1, seq) and t.shape[3] in (1, seq)
          and (t.shape[1] == 1 or t.shape[1] == heads or heads is None))
    if not ok:
        raise _NotProbeable(f"mask of shape {tuple(t.shape)} is not [B, 1|H, S, S] at S={seq}")
    return t


def _reference(positions: torch.Tensor, kind: str, n: Optional[int]) -> list[torch.Tensor]:
    """Bool ``[B, S, S]`` patterns that ``kind`` n allows (a chunk: by positions or by index)."""
    seq = positions.shape[1]
    i, j = torch.arange(seq).view(-1, 1), torch.arange(seq).view(1, -1)
    causal = (j <= i).expand(positions.shape[0], seq, seq)
    if kind == "causal":
        return [causal]
    if kind == "window":
        return [causal & (i - j < n)]
    by_pos = (positions.unsqueeze(-1) // n) == (positions.unsqueeze(-2) // n)
    return [causal & by_pos, causal & (i // n == j // n)]


def _heads_to_check(heads: Optional[int], seq: int) -> Optional[list[int]]:
    if heads is None or seq <= _ALL_HEADS_MAX_LEN:
        return None  # all
    return sorted({0, heads // 2, heads - 1})


def _total(values: list[torch.Tensor], heads_idx: Optional[list[int]], precise: bool) -> tuple[torch.Tensor, float]:
    """The sum of the terms (selected heads) and the threshold below which a pair is blocked."""
    threshold = float("-inf")
    total = None
    for t in values:
        if t.dtype.is_floating_point and t.dtype != torch.float64:
            threshold = max(threshold, torch.finfo(t.dtype).min / 2)
        if heads_idx is not None and t.shape[1] > 1:
            t = t[:, heads_idx]
        t = t.double() if precise else t.float()
        total = t if total is None else total + t
    if threshold == float("-inf"):
        threshold = -1e300
    return total, threshold


def _fit_slopes(values: torch.Tensor, pattern: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-head slope of ``values [B, H, S, S]`` along the keys, from an adjacent allowed pair
    (i, i-1) of ``pattern [B, S, S]`` (the check over every pair follows)."""
    seq = values.shape[-1]
    if seq < 2:
        return None
    rows = torch.arange(1, seq)
    pair = pattern[:, rows, rows] & pattern[:, rows, rows - 1]  # [B, S-1]
    if not bool(pair.any()):
        return None
    b, r = [int(x) for x in pair.nonzero()[0]]
    i = r + 1
    return values[b, :, i, i] - values[b, :, i, i - 1]


def _rtol(values: list[torch.Tensor]) -> float:
    """Relative tolerance of ALiBi checks: the terms' rounding (HF casts BLOOM's bias to the model dtype)."""
    eps = [torch.finfo(t.dtype).eps for t in values if t.dtype.is_floating_point and t.dtype != torch.float64]
    return max([_ALIBI_RTOL] + [2 * e for e in eps])


def _check_values(values: torch.Tensor, allowed: torch.Tensor, slopes: Optional[torch.Tensor], row_shift: bool,
                  rtol: float) -> bool:
    """values == slope_h * j + c (c = 0 unless ``row_shift``) on every allowed pair."""
    seq = values.shape[-1]
    j = torch.arange(seq, dtype=values.dtype)
    expected = torch.zeros_like(values) if slopes is None else slopes.to(values.dtype).view(1, -1, 1, 1) * j
    rest = values - expected
    if row_shift:  # the diagonal (a query and its own key) is always allowed
        rest = rest - rest.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    scale = values.masked_fill(~allowed, 0).abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    bad = (rest.abs() > rtol * scale) & allowed
    return not bool(bad.any())


def _constant_nodes(nodes: list[fx.Node]) -> list[fx.Node]:
    """Nodes of the subgraph whose value does not depend on any graph input."""
    varying: set[fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder" or any(a in varying for a in node.all_input_nodes):
            varying.add(node)
    return [n for n in nodes if n not in varying and n.op in ("call_function", "get_attr")]


def _slopes_node(nodes: list[fx.Node], env: dict[fx.Node, Any], slopes: torch.Tensor, rtol: float) -> Optional[fx.Node]:
    """A constant node of the subgraph whose value is the per-head slopes (``[H]`` preferred)."""
    found = []
    for node in _constant_nodes(nodes):
        t = env.get(node)
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.numel() == slopes.numel():
            if torch.allclose(t.reshape(-1).double(), slopes, rtol=rtol, atol=1e-7):
                found.append(node)
    found.sort(key=lambda n: env[n].dim() != 1)  # stable: earliest exactly-[H] node first
    return found[0] if found else None


def classify_bias(
    terms: list[BiasTerm],
    gm: fx.GraphModule,
    *,
    heads: Optional[int] = None,
    is_causal: bool = False,
    config_windows: Iterable[int] = (),
    config_chunks: Iterable[int] = (),
    max_probe_len: int = 8192,
    row_shift_ok: bool = True,
) -> MaskVerdict:
    """What the sum of the additive score ``terms`` (and-ed with a causal mask when ``is_causal``)
    means: causal, sliding window, chunk-local, with or without ALiBi (see the module doc).

    ``row_shift_ok=False`` (attention with sinks: softmax sees the sink, so a per-row constant
    changes the result) allows no value other than 0 on allowed pairs.
    """
    if not terms:
        return MaskVerdict(True) if is_causal else MaskVerdict(False, reason="no mask and not causal (bidirectional)")
    windows = {w for w in config_windows if isinstance(w, int) and w >= 1}
    chunks = {c for c in config_chunks if isinstance(c, int) and c >= 1}
    try:
        nodes, used_placeholders = _subgraph([t.node for t in terms])
        all_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        used = [n for n in all_placeholders if n in used_placeholders]
        literals = _window_literals(nodes)
        candidates = sorted(literals | windows | chunks)
        probed = [n for n in candidates if n + 2 <= max_probe_len]
        lens = sorted(set(_BASE_PROBE_LENS) | {m for n in probed for m in (n - 1, n, n + 1, n + 2) if m >= 1})
        probes = [torch.arange(seq).unsqueeze(0) + torch.tensor([0, 3, 11, 1][: 2 if seq <= 512 else 1]).unsqueeze(1)
                  for seq in lens]
        probes += [torch.arange(_SHIFTED_PROBE_LEN).unsqueeze(0) + (n - 3) for n in candidates if n >= 3]
        kinds = [("causal", None)] + [("window", n) for n in probed] + [("chunk", n) for n in candidates]
        slopes: Optional[torch.Tensor] = None
        env: dict[fx.Node, Any] = {}
        rtol = _ALIBI_RTOL
        for positions in probes:
            batch, seq = positions.shape
            inputs = _probe_inputs(used, positions)
            symbols = _symbol_values(all_placeholders, inputs, batch, seq)
            with torch.no_grad():
                env = _evaluate(nodes, gm, inputs, symbols)
            values = [_as_4d(env[t.node], t, batch, heads, seq) for t in terms]
            heads_idx = _heads_to_check(heads, seq)
            total, threshold = _total(values, heads_idx, precise=seq <= _ALL_HEADS_MAX_LEN)
            if bool(total.isnan().any()):
                raise _NotProbeable("mask has NaN values")
            total = total.expand(batch, total.shape[1], seq, seq)
            allowed = total > threshold
            if bool((allowed != allowed[:, :1]).any()):
                raise _NotProbeable("mask differs between heads")
            pattern = allowed[:, 0]
            if is_causal:
                pattern = pattern & _reference(positions, "causal", None)[0]
                allowed = allowed & pattern.unsqueeze(1)
            kinds = [(kind, n) for kind, n in kinds
                     if any(bool((pattern == ref).all()) for ref in _reference(positions, kind, n))]
            if not kinds:
                return MaskVerdict(False, reason=f"mask is neither causal, sliding-window nor chunked (probe seq={seq})")
            finite = total.masked_fill(~allowed, 0.0)
            if bool(finite.ne(0).any()):  # a bias on allowed pairs
                if not row_shift_ok:
                    return MaskVerdict(False, reason="additive bias together with attention sinks")
                if slopes is None and heads_idx is None:
                    slopes = _fit_slopes(finite, pattern)
            slopes_here = None if slopes is None else (slopes if heads_idx is None else slopes[heads_idx])
            if slopes_here is not None and slopes_here.numel() != total.shape[1] and total.shape[1] != 1:
                raise _NotProbeable("bias changes its head count between probes")
            rtol = _rtol(values)
            if not _check_values(finite, allowed, slopes_here, row_shift_ok, rtol):
                return MaskVerdict(False, reason=f"additive bias is neither a 0/-inf mask nor ALiBi (probe seq={seq})")
    except _NotProbeable as e:
        return MaskVerdict(False, reason=str(e))

    alibi = None
    if slopes is not None and bool(slopes.ne(0).any()):
        if heads is None or slopes.numel() != heads:
            return MaskVerdict(False, reason="ALiBi-like bias that is the same for every head")
        alibi = _slopes_node(nodes, env, slopes, rtol)
        if alibi is None:
            return MaskVerdict(False, reason="ALiBi-like bias, but no tensor in the graph holds its per-head slopes")
    kind, n = kinds[0]  # causal first; the probes around n separate the rest
    if kind == "causal":
        # sizes too long to probe: trust a literal only when the config names the same size
        unprobed = [m for m in literals if m + 2 > max_probe_len]
        if unprobed:
            named = [(m, "window" if m in windows else "chunk") for m in unprobed if (m in windows) != (m in chunks)]
            if len(named) != len(unprobed) or len(named) > 1:
                return MaskVerdict(False, reason=f"mask uses literal(s) {unprobed} beyond max_probe_len={max_probe_len}")
            (n, kind), = named
            note = f"{kind} {n} from config and graph literal, not probed"
            if kind == "window":
                return MaskVerdict(True, sliding_window=n, alibi_slopes=alibi, reason=note)
            return MaskVerdict(True, chunk_size=n, alibi_slopes=alibi, reason=note)
        return MaskVerdict(True, alibi_slopes=alibi)
    if kind == "window":
        return MaskVerdict(True, sliding_window=n, alibi_slopes=alibi)
    return MaskVerdict(True, chunk_size=n, alibi_slopes=alibi)


def classify_mask(
    mask: Optional[fx.Node],
    gm: fx.GraphModule,
    *,
    is_causal: bool = False,
    config_windows: Iterable[int] = (),
    config_chunks: Iterable[int] = (),
    max_probe_len: int = 8192,
) -> MaskVerdict:
    """Is ``mask`` (and-ed with a causal mask when ``is_causal``) causal, sliding-window or chunked?
    A mask alone carries no per-head bias: values other than 0 and -inf are refused."""
    terms = [BiasTerm(mask)] if mask is not None else []
    verdict = classify_bias(terms, gm, is_causal=is_causal, config_windows=config_windows,
                            config_chunks=config_chunks, max_probe_len=max_probe_len)
    if verdict.ok and verdict.alibi_slopes is not None:
        return MaskVerdict(False, reason="additive mask has values other than 0 and -inf (a bias, e.g. ALiBi)")
    return verdict
