"""Checks a run makes before any model work: the device and its GPU-only choices, a GPU for each
rank it spawns, the model, its ``model_kwargs`` and whether there is a checkpoint to load.

One rule for GPU-only choices: the defaults fit the device (``args.device=auto``, the compile
backend ``auto``, the ``torch`` attention backend), and a GPU-only choice made for a run without a
CUDA device is a ``ConfigError`` naming the option and what to use instead. ``--dry-run``,
``--cfg job`` and ``plan_only`` do no model work and skip these checks, so a GPU experiment still
composes and plans on a CPU machine.
"""

from __future__ import annotations

import os
import re
from typing import Any

from collections.abc import Mapping

from .errors import ConfigError


def preflight(cfg: Any, world_size: int = 1) -> Any:
    """Check the ranks, the device choices and the model; returns the ModelFactory that the checks
    built. ``world_size``: the run's, read once by the caller (``LLM``) and handed down."""
    device = run_device(cfg.args)
    check_world(world_size, device)
    check_device_choices(cfg.args, device)
    factory = check_model(cfg.args)
    check_benchmark_length(cfg, getattr(factory, "config", None))
    return factory


def check_benchmark_length(cfg: Any, model_config: Any) -> None:
    """A benchmark of random prompts whose ``isl + osl`` runs past the model's positions measures
    something nobody serves: an error, unless ``benchmark.allow_past_max_position`` says it is meant."""
    bench = cfg.benchmark
    if not bench.enabled or bench.allow_past_max_position or (bench.kind == "serve" and bench.dataset):
        return
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and bench.isl + bench.osl > max_pos:
        raise ConfigError(
            f"benchmark.isl + benchmark.osl = {bench.isl} + {bench.osl} = {bench.isl + bench.osl} exceeds the model's "
            f"max_position_embeddings={max_pos}: lower them, or set benchmark.allow_past_max_position=true to run "
            "past it on purpose"
        )


def run_device(args: Any) -> str:
    """The device type the run will use: ``cuda`` or ``cpu`` (``args.device=auto`` picks)."""
    import torch

    name = str(args.device)
    has_cuda = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if has_cuda else "cpu"
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not has_cuda:
            raise ConfigError(f"args.device={name} but this machine has no CUDA device: use args.device=auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"args.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
        return "cuda"
    return name


def _enabled(args: Any, name: str) -> Mapping | None:
    options = args.transforms.get(name)
    return options if isinstance(options, Mapping) and options.get("enabled", True) else None


def check_device_choices(args: Any, device: str) -> None:
    from autodeploy.compile import GPU_ONLY_BACKENDS

    if device == "cuda":
        _check_attention_backend(args, device)
        return
    compile_model = _enabled(args, "compile_model")
    if compile_model is not None and compile_model["backend"] in GPU_ONLY_BACKENDS:
        backend = compile_model["backend"]
        raise ConfigError(
            f"transforms/compile={backend} (args.compile_backend) needs a CUDA GPU and this run's device is "
            f"{device}: use transforms/compile=auto (torch-simple on the CPU) or torch-compile"
        )
    _check_attention_backend(args, device)


def check_world(world: int, device: str) -> None:
    """An external launcher (torchrun, SLURM) must have started ``world`` ranks (a world of one runs
    in rank 0 alone: the others have nothing to do); ranks that this process spawns on a GPU take one
    visible GPU each."""
    import torch

    from autodeploy.distributed.env import launcher_env

    env = launcher_env()
    if env is not None and world > 1 and env.world_size != world:
        raise ConfigError(f"args.world_size={world} but {env.launcher} started {env.world_size} ranks: "
                          f"set args.world_size={env.world_size} or start {world} ranks")
    if env is None and device == "cuda" and world > (gpus := torch.cuda.device_count()):
        raise ConfigError(
            f"args.world_size={world} needs {world} GPUs (one per rank) but {gpus} are visible: lower "
            "args.world_size, make more GPUs visible (CUDA_VISIBLE_DEVICES), or use args.device=cpu"
        )


def _check_attention_backend(args: Any, device: str) -> None:
    from autodeploy.custom_ops.cached_attention import get_backend

    attention = _enabled(args, "insert_cached_attention")
    if attention is None:
        return
    name = attention["backend"]
    interpreted = name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"  # Triton on the CPU (tests)
    try:
        get_backend(name)  # unknown names fail earlier, in validate_transforms
        missing = None
    except RuntimeError as e:  # not installed / not usable here: the message names the extra
        missing = str(e)
    if device != "cuda" and name != "torch" and not interpreted:
        extra = " and the flashinfer package (pip install autodeploy[gpu])" if missing and "autodeploy[gpu]" in missing else ""
        raise ConfigError(
            f"backend={name} (args.attn_backend) needs a CUDA GPU{extra} and this run's device is {device}: "
            "use backend=torch on the CPU"
        )
    if missing:
        raise ConfigError(f"backend={name} (args.attn_backend): {missing}")


def check_model(args: Any) -> Any:
    """Resolve the model, read its config with ``model_kwargs`` applied (unknown keys fail), and check
    that there are weights to load unless ``skip_loading_weights``."""
    from autodeploy.models.checkpoint import CheckpointError, find_checkpoint_files
    from autodeploy.models.factory import create_factory
    from autodeploy.models.quantized import checkpoint_scheme

    factory = create_factory(args)  # ModelResolutionError / ConfigError name the problem
    if args.skip_loading_weights:
        return factory
    if factory.source.kind == "card":
        raise ConfigError(
            f"model {factory.model} is a shape card without weights: set args.skip_loading_weights=true "
            "(random weights) or pass --model DIR (a local HF checkpoint)"
        )
    if factory.source.local_dir is not None:
        try:
            find_checkpoint_files(factory.source.local_dir)
        except CheckpointError as e:
            raise ConfigError(f"{e}; set args.skip_loading_weights=true for random weights") from None
    checkpoint_scheme(factory.config, factory.source.local_dir)  # quantization it cannot load fails here
    return factory
