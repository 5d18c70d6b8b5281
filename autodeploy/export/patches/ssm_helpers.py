"""transformers' shared SSM helpers behind ``autodeploy`` ops, for every family whose mixer calls them.

transformers 5.2x gives its SSM families module-level helpers that the mixers call by name:
``causal_conv1d_fn`` (depthwise causal conv over ``[B, C, S]``), ``mamba2_chunk_scan`` (Mamba2
SSD scan; pads ``seq`` to a multiple of the chunk and branches on it) and ``mamba_selective_scan``
(Mamba1; a Python loop over ``seq``). The scans specialize ``seq`` at export. While the export
runs, these names in the model's own modeling modules point to wrappers with the same signature
that call ``autodeploy::causal_conv1d``, ``ssm_scan`` and ``selective_scan``; everything else in
the mixers (projections, multipliers, norms, gates, head views) is HF's code, traced as it is.
This is how FalconH1, Zamba2 and Jamba export (and any other family built on the same helpers).

Only the uncached call forms are exported (no initial or final state: export runs with
``use_cache=False``); anything else is an error. Helpers are recognised by the parameters of the
function underneath any wrappers (``functools.wraps`` chains, and the ``kernels`` package's
function-as-module ``Func`` objects of transformers >= 5.25), never by a version string. A helper
whose parameters differ from the ones the wrapper reproduces gets one clear error naming the
family, the helper and the transformers version: left in place it would specialize ``seq``.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import ExportPatchMismatch, register_patch

def _no_state(helper: str, **state) -> None:
    given = [name for name, value in state.items() if value is not None and value is not False]
    if given:
        raise RuntimeError(f"export patch ssm_helper_ops: {helper} called with {given}; export runs without a cache")


def causal_conv1d_as_op(hidden_states, weight, bias=None, activation=None, **kwargs):
    """``causal_conv1d_fn``: ``hidden_states [B, C, S]`` -> ``[B, C, S]`` (HF's torch path ignores kwargs)."""
    x = hidden_states.transpose(1, 2)
    return torch.ops.autodeploy.causal_conv1d(x, weight, bias, activation).transpose(1, 2)


def mamba2_chunk_scan_as_op(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                            dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
    """``mamba2_chunk_scan``: ``x [B,S,H,P]``, ``dt [B,S,H]``, ``B/C [B,S,G,N]`` -> ``y [B,S,H,P]`` fp32."""
    _no_state("mamba2_chunk_scan", initial_states=initial_states, return_final_states=return_final_states,
              z=kwargs.get("z"))
    return torch.ops.autodeploy.ssm_scan(hidden_states, dt, A, B, C, D, dt_bias, float(dt_limit[0]),
                                         float(dt_limit[1]), int(chunk_size), bool(dt_softplus))


def mamba_selective_scan_as_op(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                               return_last_state=False, **kwargs):
    """``mamba_selective_scan``: ``x/dt/z [B,C,S]``, ``B/C [B,N,S]`` -> ``y [B,C,S]`` (fp32, gated by silu(z))."""
    _no_state("mamba_selective_scan", return_last_state=return_last_state)
    y = torch.ops.autodeploy.selective_scan(hidden_states.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2),
                                            C.transpose(1, 2), D, delta_bias, bool(delta_softplus)).transpose(1, 2)
    return y * F.silu(z) if z is not None else y


# helper name -> (its leading parameters, as the wrapper reproduces them; the wrapper)
HELPERS = {
    "causal_conv1d_fn": (("hidden_states", "weight", "bias", "activation"), causal_conv1d_as_op),
    "mamba2_chunk_scan": (("hidden_states", "dt", "A", "B", "C", "chunk_size", "D", "dt_bias", "initial_states",
                           "dt_softplus", "dt_limit", "return_final_states"), mamba2_chunk_scan_as_op),
    "mamba_selective_scan": (("hidden_states", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus",
                              "return_last_state"), mamba_selective_scan_as_op),
}


def underlying_function(obj):
    """The plain function beneath ``functools.wraps`` chains and ``kernels``' function-as-module wrappers."""
    seen = set()
    while id(obj) not in seen:
        seen.add(id(obj))
        if getattr(obj, "__wrapped__", None) is not None:
            obj = obj.__wrapped__
        elif isinstance(obj, nn.Module):  # kernels' ``Func``: its forward closes over the function it calls
            cells = getattr(type(obj).forward, "__closure__", None) or ()
            inner = [c.cell_contents for c in cells if inspect.isfunction(c.cell_contents)]
            if len(inner) != 1:
                break
            obj = inner[0]
    return obj


def _parameters(fn) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(underlying_function(fn)).parameters)
    except (TypeError, ValueError):
        return ()


def helpers_in(model: nn.Module) -> list[tuple[object, str]]:
    """(modeling module, helper name) for every helper the model's modeling modules define and we reproduce."""
    found = []
    for module_name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(module_name)
        for name, (params, _) in HELPERS.items():
            fn = getattr(module, name, None)
            if fn is None:
                continue
            actual = _parameters(fn)[: len(params)]
            if actual != params:
                import transformers

                family = getattr(getattr(model, "config", None), "model_type", None) or module_name
                raise ExportPatchMismatch(
                    f"export patch ssm_helper_ops cannot export {family}: {module_name}.{name} takes "
                    f"({', '.join(actual) or '?'}), not the ({', '.join(params)}) it reproduces "
                    f"(transformers {transformers.__version__})")
            found.append((module, name))
    return found


@register_patch("ssm_helper_ops")
@contextlib.contextmanager
def ssm_helper_ops(model: nn.Module):
    from autodeploy.custom_ops import ssm  # noqa: F401 - registers the ops

    swapped = [(module, name, getattr(module, name)) for module, name in helpers_in(model)]
    try:
        for module, name, _ in swapped:
            setattr(module, name, HELPERS[name][1])
        yield
    finally:
        for module, name, original in swapped:
            setattr(module, name, original)
