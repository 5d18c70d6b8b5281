"""Compile backends for the cached graph (used by the ``compile_model`` transform).

- ``torch-simple``: the GraphModule as is (eager FX);
- ``torch-compile``: ``torch.compile`` with its batch dims marked (``CompiledGraph``);
- ``torch-cudagraph``: CUDA graphs per decode batch size, eager otherwise (``cudagraph.py``);
- ``torch-opt``: ``CompiledGraph`` inside the CUDA-graph runner;
- ``auto`` (the default): torch-opt on a CUDA device, torch-simple on the CPU.
The two inductor backends first swap the row-wise canonical ops for their torch code
(``inline.py``), so inductor fuses them instead of calling them as opaque kernels.
Every result is called exactly like the GraphModule (same keyword inputs).

Two compiles serve every batch (``compiles="two"``, the default): one for the steps of one token
(a batch-1 decode), one for everything else (torch-opt's warm-ups and captures of the other decode
sizes, its eager prefills and mixed batches, or torch-compile's steps). ``CompiledGraph`` sees to
the things that made dynamo compile again:
- sizes 0/1 are specialized and equal sizes tied (``T == B`` in a decode batch): each call marks
  the batch dims (``BATCH_DIMS``: ``T`` of ``input_ids``/``position_ids``, ``B`` of the
  per-sequence inputs, ``G`` of ``logits_idx``): ``B`` and ``G`` unbacked, ``T`` dynamic but backed (``maybe_mark_dynamic``), so one
  token specializes: that is the second compile. Every other dim stays static (caches, page-table
  width). With ``T`` unbacked too (``compiles="one"``) a single compile serves every step, but
  inductor's kernels over the tokens are slower (norms split into two kernels, the RoPE table
  lookup recomputed per layer: docs/performance-history.md#two-compiles-h200-2026-11-30);
  ``backed_size_oblivious`` is not enough either: inductor still guards ``T != 1`` when it views
  a non-contiguous tensor (the q/k/v split of a fused projection);
- storage offsets 0/1 are specialized too (the engine's inputs are views of one buffer,
  ``position_ids`` at offset ``T``): such batch inputs are passed as copies (metadata, bytes);
- dispatch keys are guarded, and differ for inference tensors and under inference mode (graphs
  captured at build under no_grad, steps under inference mode): inference-tensor batch inputs
  are copied too, and the compiled graph always runs under inference mode;
- unbacked sizes without a bound make inductor index every kernel that spans the tokens in 64
  bits: given the cache manager's ``max_num_tokens`` / ``max_batch_size``, the graph checks the
  batch dims against them (``torch._check``), which bounds the sizes; a larger step is refused.
``compiles="dynamic"`` (or a torch without ``mark_unbacked``, with one warning) is
``torch.compile(dynamic=True)``, which compiles again for sizes 0/1 of every batch dim: a
one-prompt prefill (``B == 1``) then compiles at the first request.

The first call of a ``CompiledGraph`` that marks its dims is a prefill (``compile_graph``'s ``first_call``;
``compile_model`` runs one prompt step there when the cache manager holds its tensors): inductor's
Triton kernels benchmark their configs at their first launch, with that launch's sizes, and keep
the winner for every size: tuned at a prefill, not at torch-opt's warm-up of the largest decode
batch (32 tokens).
"""

from __future__ import annotations

import logging
import operator
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import fx, nn

from .cudagraph import LOGITS_INPUTS, SEQ_INPUTS, TOKEN_INPUTS, CudaGraphRunner
from .inline import inline_for_inductor
from .regions import CompiledRegion, Mark, cut_regions

__all__ = [
    "BATCH_DIMS", "COMPILE_BACKENDS", "COMPILES", "CompiledGraph", "CudaGraphRunner", "check_backend", "compile_graph",
    "default_batch_sizes",
]

log = logging.getLogger(__name__)

COMPILE_BACKENDS = ("torch-simple", "torch-compile", "torch-cudagraph", "torch-opt", "auto")
GPU_ONLY_BACKENDS = ("torch-cudagraph", "torch-opt")  # CUDA graphs
_USES_CUDA_GRAPHS = GPU_ONLY_BACKENDS


def _on_cuda(device: "torch.device | str") -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def resolve_auto(backend: str, device: "torch.device | str") -> str:
    """``auto`` is the backend that fits the device: torch-opt on CUDA, torch-simple elsewhere."""
    if backend != "auto":
        return backend
    return "torch-opt" if _on_cuda(device) else "torch-simple"


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


# the dim of each graph input that follows the batch: T tokens ([1, T]), B sequences ([B, ...], cu_seqlen [B+1]),
# G logits rows (logits_idx [G]: B, or up to T with prompt logprobs)
BATCH_DIMS = {**dict.fromkeys(TOKEN_INPUTS, 1), **dict.fromkeys(SEQ_INPUTS, 0), **dict.fromkeys(LOGITS_INPUTS, 0)}


def _mark_unbacked() -> Optional[Callable]:
    """``torch._dynamo.decorators.mark_unbacked`` where this torch has it (2.11 and 2.13 do), else None."""
    decorators = getattr(torch._dynamo, "decorators", None)
    return getattr(decorators, "mark_unbacked", None)


COMPILES = ("one", "two", "dynamic")


class CompiledGraph(nn.Module):
    """``torch.compile(gm)`` called like the GraphModule (see the module docstring); keyword inputs
    the graph does not take are ignored (as the CUDA-graph runner does). ``max_num_tokens`` /
    ``max_batch_size``: the largest step it will get (checked in the graph, a larger one is refused
    with a ValueError); None: unbounded. ``compiles``:
    - ``"one"``: every batch dim unbacked, one compile for every batch shape;
    - ``"two"``: the token dims backed (``maybe_mark_dynamic``), the sequence dims unbacked: steps
      of one token (a batch-1 decode) get a compile of their own, every other step shares one;
    - ``"dynamic"`` (also a torch without ``mark_unbacked``): ``torch.compile(dynamic=True)``,
      which compiles again for sizes 0/1 of every batch dim.
    ``num_shapes`` only sizes the recompile limit of ``dynamic``. ``regional`` (with ``two``
    only): the graph is cut at its cache ops and every distinct region compiled once
    (``regions.py``), when it has regions that repeat; ``self.regions`` then says how it was cut
    (else None). Outputs are inference tensors."""

    def __init__(self, gm: fx.GraphModule, num_shapes: int = 2, max_num_tokens: Optional[int] = None,
                 max_batch_size: Optional[int] = None, compiles: str = "two", regional: bool = False):
        super().__init__()
        if compiles not in COMPILES:
            raise ValueError(f"compiles must be one of {', '.join(COMPILES)}, got {compiles!r}")
        self.input_names = placeholder_names(gm)
        self.batch_dims = [(n, d) for n, d in BATCH_DIMS.items() if n in self.input_names]
        self.limits: dict[str, tuple[int, int]] = {}  # name -> (dim, largest size)
        self.regions: Optional[str] = None
        self._copied_dims = self.batch_dims  # the batch inputs forward may copy
        self._mark = _mark_unbacked() if compiles != "dynamic" else None
        if self._mark is None:
            if compiles != "dynamic":
                log.warning("torch %s has no torch._dynamo.decorators.mark_unbacked: compiling with dynamic=True, "
                            "which compiles again for batch sizes 0/1", torch.__version__)
            self.compiles = "dynamic"
            self.compiled = _torch_compile(gm, num_shapes, dynamic=True)
            return
        self.compiles = compiles
        for name, dim in self.batch_dims:
            if name in TOKEN_INPUTS or name in LOGITS_INPUTS:
                limit = max_num_tokens
            else:
                limit = max_batch_size + (name == "cu_seqlen") if max_batch_size else None
            if limit:
                self.limits[name] = (dim, int(limit))
        self.max_num_tokens = max_num_tokens
        if regional and compiles == "two":
            self.regions = cut_regions(gm, self._region)
        elif regional:  # its regions' unbacked launches made a prefill host-bound (performance-history.md)
            log.info("regional compile needs compiles=two (got %s): compiling the graph whole", compiles)
        if self.regions is not None:  # the outer graph runs as FX, its regions compiled
            self.compiled = gm
            # only what a region reads must come in as a plain copy (forward): the cache ops, run by
            # the outer graph, take the views as they are (a copy is a kernel and host time, before
            # a prefill's first kernel)
            read = {a.target for n in gm.graph.nodes if n.op == "call_module" for a in n.all_input_nodes
                    if a.op == "placeholder"}
            self._copied_dims = [(name, dim) for name, dim in self.batch_dims if name in read]
            return
        checks = [(name, dim, limit) for name, (dim, limit) in self.limits.items()]
        self.compiled = _torch_compile(_insert_size_checks(gm, checks) if checks else gm, num_shapes)

    def _region(self, template: fx.GraphModule, marks: list[Mark]) -> CompiledRegion:
        """A region's compiled template: its batch dims bounded like the graph's (``limits``)."""
        names = placeholder_names(template)
        checks = []
        for index, dim, source in marks:
            limit = self.max_num_tokens if source == "tokens" else self.limits.get(source, (dim, None))[1]
            if limit:
                checks.append((names[index], dim, int(limit)))
        return CompiledRegion(_insert_size_checks(template, checks) if checks else template, marks, self._mark_dim)

    def _mark_dim(self, source: str, t: torch.Tensor, dim: int) -> None:
        # logits_idx is unbacked like B: it has one row in every one-prompt step and batch-1 decode
        if self.compiles == "two" and source not in SEQ_INPUTS and source not in LOGITS_INPUTS:
            torch._dynamo.maybe_mark_dynamic(t, dim)  # backed: one token specializes (its own compile)
        else:
            self._mark(t, dim)

    @property
    def marks_batch_dims(self) -> bool:
        """False for ``torch.compile(dynamic=True)``."""
        return self._mark is not None

    def forward(self, **kwargs):
        inputs = {n: kwargs[n] for n in self.input_names}
        if self._mark is None:
            with torch.inference_mode():  # one grad mode for captures and steps (dynamo guards on it)
                return self.compiled(**inputs)
        for name, (dim, limit) in self.limits.items():
            if inputs[name].shape[dim] > limit:  # else the graph's check fails, as an obscure dynamo error
                raise ValueError(f"{name} has {inputs[name].shape[dim]} rows along dim {dim}; the graph was "
                                 f"compiled for at most {limit} (max_num_tokens / max_batch_size)")
        with torch.inference_mode(False):
            for name, dim in self._copied_dims:
                t = inputs[name]
                # storage offsets 0/1 are specialized, dispatch keys guarded (module docstring):
                # views at an offset and inference tensors, bytes of metadata, go in as plain copies
                if t.storage_offset() or t.is_inference():
                    inputs[name] = t = t.clone()
                # on every call: compiling is lazy, and a recompile must see the marks too; a
                # compiled graph is reused for inputs marked the same or not at all (the regions
                # mark their own inputs)
                if self.regions is None:
                    self._mark_dim(name, t, dim)
        with torch.inference_mode():  # whatever the caller's mode: it changes the guarded dispatch keys
            return self.compiled(**inputs)


def _insert_size_checks(gm: fx.GraphModule, checks: Iterable[tuple[str, int, int]]) -> fx.GraphModule:
    """Puts ``torch._check(input.size(dim) <= limit)`` for ``checks`` ((name, dim, limit)) at the
    top of ``gm``. Traced by dynamo, the checks bound the unbacked sizes: inductor indexes in 32 bits
    only where it can prove that safe, so unbounded sizes make every kernel that spans the tokens
    index in 64 bits. (In ``gm`` itself, not a wrapper GraphModule: the engine and the roofline look
    for the weights in the first GraphModule of the compiled model.)"""
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    last = list(placeholders.values())[-1]
    with gm.graph.inserting_after(last):
        for name, dim, limit in reversed(list(checks)):  # each goes right after the placeholders
            size = gm.graph.call_method("size", (placeholders[name], dim))
            with gm.graph.inserting_after(size):
                fits = gm.graph.call_function(operator.le, (size, limit))
            with gm.graph.inserting_after(fits):
                gm.graph.call_function(torch._check, (fits,))
    gm.recompile()
    return gm


def _torch_compile(model: nn.Module, num_shapes: int, dynamic: bool = False) -> nn.Module:
    if not dynamic:  # batch dims marked, the rest static: the default recompile limit is plenty, untouched
        return torch.compile(model)
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
    max_num_tokens: Optional[int] = None,
    max_batch_size: Optional[int] = None,
    compiles: str = "two",
    cublaslt_min_batch: Optional[int] = None,
    first_call: Optional[Callable[[nn.Module], None]] = None,
    regional: bool = False,
    prefill_tokens: Iterable[int] = (),
) -> tuple[nn.Module, str]:
    """Returns (compiled model, backend actually used). With ``example_inputs`` (the cache
    manager's tensors) CUDA graphs are captured now, else on the first decode step.
    ``max_num_tokens`` / ``max_batch_size``: the largest step the compiled graph will get (see
    ``CompiledGraph``). ``first_call(compiled_graph)``: run on a one-compile ``CompiledGraph``
    (torch-compile, torch-opt) before anything else calls it, captures included; it should run a
    prefill-sized step (module docstring). ``regional``: see ``CompiledGraph``. ``prefill_tokens``:
    the token counts of one-prompt prefill graphs to capture (``cudagraph.prefill_buckets``)."""
    backend = resolve_auto(check_backend(backend), device)
    if backend in _USES_CUDA_GRAPHS and not _on_cuda(device):
        log.warning("compile backend %s needs a CUDA device (device is %s): using torch-simple", backend, device)
        backend = "torch-simple"
    if backend == "torch-simple":
        return gm, backend
    if backend == "torch-cudagraph":
        model = gm
    else:  # torch-compile and torch-opt: one CompiledGraph, one first call
        inline_for_inductor(gm)  # norms, RoPE, SiLU*mul visible to inductor, not opaque ops
        model = CompiledGraph(gm, len(batch_sizes) if backend == "torch-opt" else 2, max_num_tokens=max_num_tokens,
                              max_batch_size=max_batch_size, compiles=compiles, regional=regional)
        if model.regions:
            log.info("compile_model: regional compile, %s", model.regions)
        if first_call is not None and model.marks_batch_dims:
            first_call(model)  # before any capture: inductor tunes its kernels at this call's sizes
    if backend == "torch-compile":
        return model, backend
    runner = CudaGraphRunner(model, placeholder_names(gm), batch_sizes, warmup_iters, prepare_hooks,
                             cublaslt_min_batch, prefill_tokens)
    if example_inputs is not None:
        runner.capture(example_inputs)
    return runner, backend
