"""Compile backends for the cached graph (used by the ``compile_model`` transform).

- ``torch-simple``: the GraphModule as is (eager FX);
- ``torch-compile``: ``torch.compile(dynamic=True)``;
- ``torch-cudagraph``: CUDA graphs per decode batch size, eager otherwise (``cudagraph.py``);
- ``torch-opt``: ``torch.compile(dynamic=True)`` inside the CUDA-graph runner;
- ``auto`` (the default): torch-opt on a CUDA device, torch-simple on the CPU.
The two inductor backends first swap the row-wise canonical ops for their torch code
(``inline.py``), so inductor fuses them instead of calling them as opaque kernels.
Every result is called exactly like the GraphModule (same keyword inputs).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import fx, nn

from .cudagraph import CudaGraphRunner
from .inline import inline_for_inductor

__all__ = [
    "COMPILE_BACKENDS", "CompiledGraph", "CudaGraphRunner", "check_backend", "compile_graph", "default_batch_sizes",
]

log = logging.getLogger(__name__)

COMPILE_BACKENDS = ("torch-simple", "torch-compile", "torch-cudagraph", "torch-opt", "auto")
GPU_ONLY_BACKENDS = ("torch-cudagraph", "torch-opt")  # CUDA graphs
_USES_CUDA_GRAPHS = GPU_ONLY_BACKENDS


def resolve_auto(backend: str, device: "torch.device | str") -> str:
    """``auto`` is the backend that fits the device: torch-opt on CUDA, torch-simple elsewhere."""
    if backend != "auto":
        return backend
    return "torch-opt" if torch.device(device).type == "cuda" and torch.cuda.is_available() else "torch-simple"


def check_backend(name: str) -> str:
    if name not in COMPILE_BACKENDS:
        raise ValueError(f"unknown compile backend {name!r}; choose one of {', '.join(COMPILE_BACKENDS)}")
    return name


def default_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, and max_batch_size itself. Padding a decode batch up to
    the next size costs little (decode is bound by reading the weights, padded rows attend to one
    token), and fewer graphs mean a faster build and less graph memory."""
    sizes = {b for b in (1, 2, 4) if b <= max_batch_size}
    sizes.update(range(8, max_batch_size + 1, 8))
    sizes.add(max_batch_size)
    return sorted(sizes)


def clamp_batch_sizes(sizes: Iterable[int], max_batch_size: int) -> list[int]:
    sizes = sorted({int(s) for s in sizes})
    bad = [s for s in sizes if not 1 <= s <= max_batch_size]
    if bad:
        log.warning("cuda_graph_batch_sizes %s outside [1, max_batch_size=%d] are dropped", bad, max_batch_size)
    return [s for s in sizes if 1 <= s <= max_batch_size]


class CompiledGraph(nn.Module):
    """``torch.compile(gm, dynamic=True)`` called like the GraphModule; keyword inputs the graph does
    not take are ignored (as the CUDA-graph runner does)."""

    def __init__(self, gm: fx.GraphModule, num_shapes: int = 2):
        super().__init__()
        self.input_names = placeholder_names(gm)
        self.compiled = _torch_compile(gm, num_shapes)

    def forward(self, **kwargs):
        return self.compiled(**{n: kwargs[n] for n in self.input_names})


def _torch_compile(model: nn.Module, num_shapes: int) -> nn.Module:
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), num_shapes + 8))  # 0/1-specialized sizes + a few
    return torch.compile(model, dynamic=True)


def placeholder_names(gm: nn.Module) -> list[str]:
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"compile_model expects an fx.GraphModule, got {type(gm).__name__}")
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def compile_graph(
    gm: fx.GraphModule,
    backend: str,
    device: torch.device,
    batch_sizes: list[int],
    example_inputs: Optional[Mapping[str, torch.Tensor]] = None,
    prepare_hooks: Iterable[Callable] = (),
    warmup_iters: int = 2,
) -> tuple[nn.Module, str]:
    """Returns (compiled model, backend actually used). With ``example_inputs`` (the cache
    manager's tensors) CUDA graphs are captured now, else on the first decode step."""
    backend = resolve_auto(check_backend(backend), device)
    if backend in _USES_CUDA_GRAPHS and (torch.device(device).type != "cuda" or not torch.cuda.is_available()):
        log.warning("compile backend %s needs a CUDA device (device is %s): using torch-simple", backend, device)
        backend = "torch-simple"
    if backend == "torch-simple":
        return gm, backend
    if backend in ("torch-compile", "torch-opt"):
        inline_for_inductor(gm)  # norms, RoPE, SiLU*mul visible to inductor, not opaque ops
    if backend == "torch-compile":
        return CompiledGraph(gm), backend
    inner = _torch_compile(gm, len(batch_sizes)) if backend == "torch-opt" else gm
    runner = CudaGraphRunner(inner, placeholder_names(gm), batch_sizes, warmup_iters, prepare_hooks)
    if example_inputs is not None:
        runner.capture(example_inputs)
    return runner, backend
