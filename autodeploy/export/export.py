"""torch.export of an HF causal LM into the GraphModule the transforms work on (docs/architecture.md).

``export_to_gm(model, max_batch_size=..., max_seq_len=...)`` returns a plain ``fx.GraphModule``:

- ``forward(input_ids [B, S] int64, position_ids [B, S] int64) -> logits [B, S, V]``;
- named dynamic dims ``batch`` and ``seq`` (min 1; never ``Dim.AUTO``, which can specialize
  silently), non-strict, under ``torch.no_grad()`` and the export patches that apply to the model;
  if torch's range solver rejects the named dims (a ``ConstraintViolationError`` on guards it cannot
  prove), export is retried once with ``Dim.DYNAMIC(min=1, max=...)`` hints, with a warning, and a
  batch/seq dim that came out as a constant is an ``ExportError``;
- parameters/buffers are ``get_attr`` nodes whose FQNs are the HF state-dict keys (no wrapper
  prefix); placeholders carry ``meta["val"]`` with symbolic shapes;
- no runtime guards: the input-range checks and ``_assert_tensor_metadata`` nodes are removed, so
  later stages may feed other shapes (e.g. a flattened batch) and move the graph between devices.

It runs wherever the model is: on ``meta`` no weight memory is touched (the 8B shape exports in
seconds). ``gm.meta["autodeploy_export"]`` records the time, the patches and the model class.
"""

from __future__ import annotations

import logging
import time
import types
from typing import Iterable

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from .patches import export_patches

log = logging.getLogger(__name__)

# graph nodes that only check things at runtime; they pin devices/dtypes/shapes seen at export
_CHECK_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten.sym_constrain_range.default,
}


class ExportError(RuntimeError):
    """torch.export failed; the message names the model class."""


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _is_constraint_violation(e: Exception) -> bool:
    # non-strict export raises it as is, strict export wraps it in a UserError
    return isinstance(e, ConstraintViolationError) or getattr(getattr(e, "error_type", None), "name", "") == (
        "CONSTRAINT_VIOLATION")


def _first_violation(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("- ")), lines[0] if lines else type(e).__name__)


def _constant_dims(gm: fx.GraphModule) -> list[str]:
    """``input_ids.shape[1] = 8`` for each batch/seq dim of an input that export made a constant."""
    out = []
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            out += [f"{node.name}.shape[{i}] = {d}" for i, d in enumerate(val.shape[:2])
                    if not isinstance(d, torch.SymInt) or d.node.expr.is_number]
    return out


def _logits_forward(model: nn.Module):
    """A forward with exactly (input_ids, position_ids) that returns the logits tensor."""
    hf_forward = type(model).forward

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return hf_forward(self, input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    return types.MethodType(forward, model)


def export_to_gm(
    model: nn.Module,
    *,
    max_batch_size: int,
    max_seq_len: int,
    strict: bool = False,
    patches: Iterable[str] | None = None,
) -> fx.GraphModule:
    """Export ``model`` (HF causal LM, any device incl. meta) to a GraphModule; see module docstring.

    ``patches``: names of export patches to apply (default: every registered patch whose model
    types include the model's ``config.model_type``).
    """
    model_class = type(model).__name__
    device = _model_device(model)
    batch_max, seq_max = max(2, int(max_batch_size)), max(2, int(max_seq_len))
    # example sizes >= 2 so export does not specialize them as 0/1
    example_batch, example_seq = 2, min(8, max(2, int(max_seq_len)))
    input_ids = torch.zeros(example_batch, example_seq, dtype=torch.long, device=device)
    position_ids = torch.arange(example_seq, dtype=torch.long, device=device).repeat(example_batch, 1)

    def export(batch, seq):
        dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
        with torch.no_grad(), export_patches(model, patches) as applied:
            program = torch.export.export(
                model, (input_ids, position_ids), dynamic_shapes=dynamic_shapes, strict=strict
            )
        return program, applied

    was_training = model.training
    model.eval()
    had_instance_forward = "forward" in model.__dict__
    original_forward = model.__dict__.get("forward")
    model.forward = _logits_forward(model)
    t0 = time.perf_counter()
    dims = "named"
    try:
        try:
            program, applied = export(Dim("batch", min=1, max=batch_max), Dim("seq", min=1, max=seq_max))
        except Exception as e:  # noqa: BLE001 - only a constraint violation is retried
            if not _is_constraint_violation(e):
                raise
            # e.g. torch 2.11 on Bloom's ALiBi: guards true for every size that its solver cannot prove;
            # hints skip that check, and a dim that export specializes anyway is caught below
            log.warning("export of %s: named dims rejected (%s); retrying with Dim.DYNAMIC hints", model_class,
                        _first_violation(e))
            dims = "Dim.DYNAMIC"
            program, applied = export(Dim.DYNAMIC(min=1, max=batch_max), Dim.DYNAMIC(min=1, max=seq_max))
    except Exception as e:  # noqa: BLE001 - re-raised with the model class
        msg = str(e).strip().splitlines()
        short = "\n".join(msg[:12]) if msg else ""
        raise ExportError(f"torch.export failed for {model_class}: {type(e).__name__}: {short}") from e
    finally:
        if had_instance_forward:
            model.forward = original_forward
        else:
            del model.forward
        model.train(was_training)
    export_time = time.perf_counter() - t0

    gm = _to_plain_graph_module(program.module(), model)
    constant = _constant_dims(gm)
    if constant:
        raise ExportError(f"torch.export ({dims} dims) made batch/seq of {model_class} constants: "
                          f"{', '.join(constant)}; the graph would only run at those sizes")
    gm.meta["autodeploy_export"] = {"time_s": export_time, "patches": applied, "model_class": model_class,
                                    "dims": dims}
    log.info("exported %s in %.2fs (%d nodes, patches: %s)", model_class, export_time, len(gm.graph.nodes),
             ", ".join(applied) or "none")
    return gm


def _to_plain_graph_module(exported: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Drop export's runtime guards and pytree calling convention; keep FQNs and meta['val']."""
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _CHECK_OPS and not node.users:
            graph.erase_node(node)
    output = graph.output_node() if hasattr(graph, "output_node") else next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    while isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    output.args = (result,)
    graph._codegen = fx.graph.CodeGen()  # plain forward(input_ids, position_ids)
    graph.eliminate_dead_code()
    gm = fx.GraphModule(exported, graph, class_name="GraphModule")
    # GraphModule re-registers buffers as persistent; keep HF's flags (inv_freq is not a checkpoint key)
    non_persistent = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        non_persistent.update(prefix + n for n in getattr(module, "_non_persistent_buffers_set", ()))
    for mod_name, module in gm.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name in list(module._buffers):
            if prefix + name in non_persistent:
                module._non_persistent_buffers_set.add(name)
    gm.graph.lint()
    gm.recompile()
    return gm
