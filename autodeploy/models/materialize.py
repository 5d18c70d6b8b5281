"""Helpers that turn a model built on ``meta`` into one with real tensors on a device.

Used by ``ModelFactory.load_weights``; they work on the HF module and on the exported GraphModule
alike (both address tensors by the same dotted FQNs).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from .checkpoint import SliceSpec, normalize_slices, read_ranges


@dataclass
class ModelTensor:
    fqn: str
    tensor: torch.Tensor
    is_param: bool
    persistent: bool = True


def model_tensors(model: nn.Module) -> list[ModelTensor]:
    """Every parameter and buffer under every name it has (tied tensors appear once per name)."""
    out: list[ModelTensor] = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, param in module._parameters.items():
            if param is not None:
                out.append(ModelTensor(prefix + name, param, True))
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for name, buf in module._buffers.items():
            if buf is not None:
                out.append(ModelTensor(prefix + name, buf, False, name not in non_persistent))
    # named_modules(remove_duplicate=False) can yield a shared submodule twice under the same name
    seen: set[str] = set()
    unique = []
    for t in out:
        if t.fqn not in seen:
            seen.add(t.fqn)
            unique.append(t)
    return unique


def set_tensor(model: nn.Module, fqn: str, value: torch.Tensor, is_param: bool) -> torch.Tensor:
    """Put ``value`` at ``fqn`` (wrapped as a frozen Parameter if ``is_param``); returns what was set,
    so tied names can be given the very same object."""
    mod_name, _, name = fqn.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if is_param:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        module._parameters[name] = value
    else:
        module._buffers[name] = value
    return value


def slice_tensor(tensor: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
    ranges = normalize_slices(spec)
    if not ranges:
        return tensor

    def box(spans: dict[int, tuple[int, int]]) -> torch.Tensor:
        out = tensor
        for dim, (start, stop) in spans.items():
            out = out.narrow(dim, start, stop - start)
        return out

    return read_ranges(ranges, tensor.dim(), box)


def _seed_for(fqn: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{fqn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_tensor(fqn: str, shape: list[int], dtype: torch.dtype, device: torch.device, std: float,
                  spec: SliceSpec = None, seed: int = 0) -> torch.Tensor:
    """HF-like init, deterministic per (seed, name): every rank draws the full tensor and keeps its slice.

    Matrices get N(0, std); biases zeros; Mamba ``A_log`` log(1..n) as HF does; other vectors (norm
    weights, D, dt_bias) ones.
    """
    name = fqn.rsplit(".", 1)[-1]
    if len(shape) >= 2 and dtype.is_floating_point:
        gen = torch.Generator(device=device)
        gen.manual_seed(_seed_for(fqn, seed))
        full = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
    elif name == "bias" or (name.endswith("_bias") and name != "dt_bias") or not dtype.is_floating_point:
        full = torch.zeros(shape, dtype=dtype, device=device)
    elif name == "A_log":
        full = torch.log(torch.arange(1, math.prod(shape) + 1, dtype=torch.float32, device=device))
        full = full.reshape(shape).to(dtype)
    else:
        full = torch.ones(shape, dtype=dtype, device=device)
    return slice_tensor(full, spec).contiguous()


def replace_device_literals(gm: fx.GraphModule, device: torch.device) -> int:
    """Point ``device=meta`` arguments baked into the graph at export (arange, to, ...) to ``device``.

    Placeholders' fake ``meta["val"]`` move to ``device`` as well; other nodes' values are stale
    until the next shape propagation.
    """
    meta = torch.device("meta")

    def fix(value):
        if isinstance(value, torch.device) and value == meta:
            return device
        if isinstance(value, str) and value == "meta":
            return str(device)
        return value

    changed = 0
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        # inputs' fake values move too, so shape propagation sees inputs and weights on one device
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.device == meta:
            fake_mode = getattr(val, "fake_mode", None)
            if fake_mode is not None:
                with fake_mode:
                    node.meta["val"] = val.to(device)
        new_args = fx.node.map_aggregate(node.args, fix)
        new_kwargs = fx.node.map_aggregate(node.kwargs, fix)
        if new_args != node.args or new_kwargs != node.kwargs:
            node.args, node.kwargs = new_args, new_kwargs
            changed += 1
    if changed:
        gm.recompile()
    return changed


def nonpersistent_buffer_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Real values of the non-persistent buffers (RoPE ``inv_freq``, embedding scales, ...).

    They are not in checkpoints, and a model built on meta holds no values for them. transformers
    restores them in ``_init_weights`` after its own meta-device loading, so we do what it does:
    materialize only the owning module on CPU, run the model's ``_init_weights`` on it, keep the
    buffers and put the module back on meta. Some models set a buffer from a parent's
    ``_init_weights`` (FalconH1's ``mup_vector`` from the model's): until every buffer has been
    written, the parents' are run too, nearest first. A buffer nothing writes is an error, never
    left holding whatever memory ``to_empty`` gave it.
    """
    values: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        names = [n for n in getattr(module, "_non_persistent_buffers_set", ()) if module._buffers.get(n) is not None]
        if not names:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        known = [n for n in names if module._buffers[n].device.type != "meta"]
        values.update({prefix + n: module._buffers[n].detach().clone() for n in known})
        names = [n for n in names if n not in known]
        if not names:
            continue
        originals = (dict(module._parameters), dict(module._buffers))
        try:
            module.to_empty(device="cpu", recurse=False)
            init_fn = getattr(model, "_init_weights", None)
            if init_fn is None:
                raise RuntimeError(f"{type(model).__name__} has no _init_weights")
            empty = {n: (module._buffers[n], module._buffers[n]._version) for n in names}

            def unwritten() -> list[str]:  # written = replaced or modified in place
                return [n for n, (buf, version) in empty.items()
                        if module._buffers[n] is buf and buf._version == version]

            with torch.no_grad():
                init_fn(module)
                for parent in _parents(model, mod_name):
                    if not unwritten():
                        break
                    init_fn(parent)
            if unwritten():
                raise RuntimeError(f"no _init_weights of {type(module).__name__} or its parents sets {unwritten()}")
            for n in names:
                values[prefix + n] = module._buffers[n].detach().clone()
        except Exception as e:  # noqa: BLE001 - re-raised with the buffer names
            raise RuntimeError(
                f"cannot compute the non-persistent buffer(s) {[prefix + n for n in names]} of "
                f"{type(module).__name__} for a model built on meta: {type(e).__name__}: {e}"
            ) from e
        finally:
            module._parameters.update(originals[0])
            module._buffers.update(originals[1])
    return values


def _parents(model: nn.Module, mod_name: str) -> list[nn.Module]:
    """The modules that contain ``mod_name``, nearest first, ending with ``model``."""
    parts = mod_name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, 0, -1)] + [model]
