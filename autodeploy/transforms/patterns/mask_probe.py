"""Decide what an attention mask computed inside the graph means, by running it on probe inputs.

HF builds the causal mask from ``position_ids`` inside the graph (packed-sequence detection,
sliding-window overlay, padding-free bool or additive float masks). Instead of recognizing each
way of writing it, the mask's subgraph is evaluated on concrete probe inputs (several batch and
sequence sizes, shifted positions) and compared with plain causal and sliding-window masks. The
attention may drop its mask only when one of those matches every probe.

Window sizes come from integer literals in the mask's subgraph and from the model config; each
candidate W is probed at sequence lengths around W so that "causal" and "window W" differ there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import fx
from torch.fx.node import map_arg

from .nodes import is_op


aten = torch.ops.aten

# int literals of these ops inside a mask subgraph are window-size candidates
_ARITH_AND_COMPARE = (
    aten.sub.Tensor, aten.sub.Scalar, aten.add.Tensor, aten.add.Scalar, aten.rsub.Scalar,
    aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.eq.Scalar, aten.ne.Scalar, aten.remainder.Scalar,
    aten.floor_divide.default, aten.div.Tensor_mode,
)
_BASE_PROBE_LENS = (1, 2, 5, 16)


@dataclass
class MaskVerdict:
    ok: bool  # the mask is causal, optionally with a sliding window
    sliding_window: Optional[int] = None
    reason: str = ""


class _NotProbeable(Exception):
    pass


def _mask_inputs(mask: fx.Node) -> tuple[list[fx.Node], set[fx.Node]]:
    """The mask's subgraph (stopping at shape queries of other tensors) and its placeholders."""
    nodes: set[fx.Node] = set()
    stack = [mask]
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
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
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


def _probe_inputs(placeholders: list[fx.Node], batch: int, seq: int) -> dict[fx.Node, torch.Tensor]:
    inputs = {}
    offsets = torch.tensor([0, 3, 11, 1][:batch]).unsqueeze(1)
    for node in placeholders:
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.dtype.is_floating_point:
            raise _NotProbeable(f"mask depends on input {node.name} that is not a [batch, seq] integer tensor")
        if _is_positions(node):
            inputs[node] = torch.arange(seq).unsqueeze(0) + offsets
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


def _evaluate(nodes: list[fx.Node], gm: fx.GraphModule, inputs, symbols) -> torch.Tensor:
    env: dict[fx.Node, Any] = {}
    for node in nodes:
        if node.op == "placeholder":
            env[node] = inputs[node]
        elif node.op == "get_attr":
            t = _get_attr(gm, node.target)
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
    return env[nodes[-1]]


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    """A get_attr target: a dotted path (``model.lifted_tensor_0``: export lifts tensor constants
    the mask code creates into the submodule that made them)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _allowed(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Bool ``[batch, seq, seq]`` of allowed (query, key) pairs from a bool or additive mask."""
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.dtype.is_floating_point:
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | blocked).all()):
            raise _NotProbeable("additive mask has values other than 0 and -inf (a bias, e.g. ALiBi)")
        allowed = ~blocked
    else:
        raise _NotProbeable(f"mask of dtype {mask.dtype}")
    if allowed.dim() != 4 or tuple(allowed.shape[-2:]) != (seq, seq):
        raise _NotProbeable(f"mask of shape {tuple(allowed.shape)} is not [B, 1|H, S, S] at S={seq}")
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise _NotProbeable("mask differs between heads")
    return allowed[:, 0].expand(batch, seq, seq)


def _reference(seq: int, window: Optional[int]) -> torch.Tensor:
    q = torch.arange(seq).unsqueeze(1)
    k = torch.arange(seq).unsqueeze(0)
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def classify_mask(
    mask: Optional[fx.Node],
    gm: fx.GraphModule,
    *,
    is_causal: bool = False,
    config_windows: Iterable[int] = (),
    max_probe_len: int = 8192,
) -> MaskVerdict:
    """Is ``mask`` (and-ed with a causal mask when ``is_causal``) plain causal or sliding-window?"""
    if mask is None:
        return MaskVerdict(True) if is_causal else MaskVerdict(False, reason="no mask and not causal (bidirectional)")
    try:
        nodes, used_placeholders = _mask_inputs(mask)
        all_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        config_windows = {w for w in config_windows if isinstance(w, int) and w >= 1}
        literals = _window_literals(nodes)
        candidates = sorted(literals | config_windows)
        probe_windows = [w for w in candidates if w + 2 <= max_probe_len]
        lens = sorted(set(_BASE_PROBE_LENS) | {n for w in probe_windows for n in (w - 1, w, w + 1, w + 2) if n >= 1})
        consistent: list[Optional[int]] = [None, *probe_windows]
        for seq in lens:
            batch = 2 if seq <= 512 else 1
            inputs = _probe_inputs([n for n in all_placeholders if n in used_placeholders], batch, seq)
            symbols = _symbol_values(all_placeholders, inputs, batch, seq)
            with torch.no_grad():
                out = _evaluate(nodes, gm, inputs, symbols)
            allowed = _allowed(out, batch, seq)
            if is_causal:
                allowed = allowed & _reference(seq, None)
            consistent = [w for w in consistent if bool((allowed == _reference(seq, w)).all())]
            if not consistent:
                return MaskVerdict(False, reason=f"mask is neither causal nor sliding-window (probe seq={seq})")
    except _NotProbeable as e:
        return MaskVerdict(False, reason=str(e))
    window = consistent[0]  # probes at W+1 separate every candidate from causal and from each other
    # windows too long to probe: trust a literal only when the config names the same window
    unprobed = [w for w in literals if w + 2 > max_probe_len]
    if unprobed and window is None:
        trusted = [w for w in unprobed if w in config_windows]
        if len(trusted) != len(unprobed) or len(trusted) > 1:
            return MaskVerdict(False, reason=f"mask uses literal(s) {unprobed} beyond max_probe_len={max_probe_len}")
        return MaskVerdict(True, trusted[0], reason=f"window {trusted[0]} from config and graph literal, not probed")
    return MaskVerdict(True, window)
