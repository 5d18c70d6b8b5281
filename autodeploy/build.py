"""Build an engine from the resolved ``args``: factory -> transform pipeline -> engine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from .config.schema import AutoDeployArgs

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA if available; a CUDA device is the current one (each rank has set its own)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"args.device={name!r} but no CUDA device is available (use args.device=cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class Built:
    engine: Any
    factory: Any
    report: list[dict[str, Any]]  # one row per transform (see TransformRecord)
    build_s: float
    sharding: Any = None  # the sharding Plan (world_size > 1)
    phases: dict[str, float] | None = None  # seconds: setup (factory, cache), pipeline, tokenizer + engine


def build_engine(args: AutoDeployArgs, *, rank: int = 0, world_size: int = 1, progress: bool = True,
                 factory: Any = None) -> Built:
    """Factory -> transform pipeline (with a progress bar) -> engine. ``factory``: one already made
    from these ``args`` (preflight's), else ``create_factory(args)``."""
    from tqdm.auto import tqdm

    from .build_cache import BuildCache
    from .models.factory import create_factory
    from .runtime.engine import Engine
    from .runtime.kv_cache import CacheInterface
    from .transforms.interface import BuildContext
    from .transforms.optimizer import InferenceOptimizer

    t0 = time.perf_counter()
    device = resolve_device(args.device)
    factory = factory if factory is not None else create_factory(args)
    cache = CacheInterface.from_args(args, device)
    t_setup = time.perf_counter()
    ctx = BuildContext(
        args=args, factory=factory, device=device, dtype=factory.dtype, rank=rank, world_size=world_size, cache=cache
    )
    optimizer = InferenceOptimizer(args.transforms)
    log.info("building %s (%s) on %s, %s: %d transforms", args.model, factory.model_class_name, device,
             factory.dtype, len(optimizer.pipeline))
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    with tqdm(total=len(optimizer.pipeline), desc=f"build (rank {rank})" if world_size > 1 else "build",
              unit="transform", disable=None if progress else True) as bar:

        def started(name: str) -> None:  # the bar counts transforms started, named as they run
            bar.set_postfix_str(name)
            bar.update(1)

        model = optimizer(ctx, progress=started, cache=BuildCache.for_build(ctx))
    t_pipeline = time.perf_counter()
    tokenizer = None if args.skip_tokenizer_init or rank > 0 else factory.init_tokenizer()
    engine = Engine(model, cache, tokenizer, eos_token_id=getattr(factory.config, "eos_token_id", None),
                    vocab_size=factory.config.vocab_size,
                    prefill_chunk_size=args.prefill_chunk_size, overlap=args.overlap_scheduler)
    end = time.perf_counter()
    phases = {"setup": t_setup - t0, "pipeline": t_pipeline - t_setup, "engine": end - t_pipeline}
    log.info("built in %.1fs (%s)", end - t0, ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
    return Built(engine, factory, [r.to_dict() for r in optimizer.report], end - t0, ctx.shared.get("sharding_plan"),
                 phases)


def plan_sharding(args: AutoDeployArgs, world_size: int) -> Built:
    """Plan-only mode: the pipeline up to and including ``sharding`` on meta, in this one process,
    as rank 0 of ``world_size`` (no process group, no weights): a 70B plan on a laptop."""
    from .models.factory import create_factory
    from .transforms.interface import BuildContext, Stage
    from .transforms.optimizer import InferenceOptimizer

    t0 = time.perf_counter()
    factory = create_factory(args)
    transforms = {name: opts for name, opts in args.transforms.items()
                  if Stage.parse(opts["stage"]) <= Stage.SHARDING}
    ctx = BuildContext(args=args, factory=factory, device=torch.device("meta"), dtype=factory.dtype, rank=0,
                       world_size=world_size)
    optimizer = InferenceOptimizer(transforms)
    optimizer(ctx)
    return Built(None, factory, [r.to_dict() for r in optimizer.report], time.perf_counter() - t0,
                 ctx.shared.get("sharding_plan"))
