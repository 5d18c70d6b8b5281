"""The composed config's last step: shortcuts mirrored for display, values checked, limits fitted."""

from __future__ import annotations

import logging
import re

from omegaconf import DictConfig, OmegaConf, open_dict

from .cli import SHORTCUTS
from .errors import ConfigError
from .schema import CHOICES, MINIMUMS

log = logging.getLogger(__name__)


def finalize(cfg: DictConfig) -> None:
    """Mirror the model alias and the shortcuts (they show their transform's value), then check values."""
    args = cfg.args
    cfg.model = args.model or cfg.model  # args.model holds the last model named anywhere (config/cli.py)
    if not cfg.model:
        raise ConfigError("no model given: pass model=<card>, --model <card|dir|hub id>, or set `model:` in a YAML file")
    args.model = cfg.model
    for short, (name, option) in SHORTCUTS.items():
        transform = args.transforms.get(name)
        if isinstance(transform, DictConfig) and "stage" in transform:
            args[short] = transform.get(option)
        elif isinstance(transform, DictConfig):
            log.warning("args.%s has no effect: transform %s is not in the pipeline", short, name)
            with open_dict(args.transforms):
                del args.transforms[name]
    _check_values(cfg)
    _fit_limits(cfg)


def _check_values(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if key == "args.device" and isinstance(value, str) and re.fullmatch(r"cuda:\d+", value):
            continue
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")
    for key, minimum in MINIMUMS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < minimum:
            raise ConfigError(f"{key}={value} must be >= {minimum}")
    if any(b < 1 for b in cfg.benchmark.batch_sizes):
        raise ConfigError(f"benchmark.batch_sizes={list(cfg.benchmark.batch_sizes)} must all be >= 1")
    if not cfg.benchmark.request_rate > 0:
        raise ConfigError(f"benchmark.request_rate={cfg.benchmark.request_rate} must be > 0 (inf = all requests at once)")
    ratio = cfg.args.free_mem_ratio
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"args.free_mem_ratio={ratio} must be within [0, 1]")
    from autodeploy.runtime.sampling_params import SamplingParams

    try:  # one rule for sampling values: the Python API's (top_k -1, 0 or null = off, as in vLLM)
        SamplingParams(**OmegaConf.to_container(cfg.prompt.sp_kwargs, resolve=True))
    except ValueError as e:
        raise ConfigError(f"prompt.sp_kwargs.{e}") from None
    if not isinstance(cfg.args.transforms, DictConfig):
        raise ConfigError("args.transforms must be a mapping of transform name -> options")
    for name, options in cfg.args.transforms.items():
        if not isinstance(options, DictConfig):
            raise ConfigError(f"args.transforms.{name} must be a mapping of options, got {options!r}")


def _fit_limits(cfg: DictConfig) -> None:
    """Raise limits that a requested batch would exceed (as the reference does), saying so."""
    args = cfg.args
    if cfg.prompt.batch_size > args.max_batch_size:
        log.info("args.max_batch_size raised from %d to prompt.batch_size=%d", args.max_batch_size, cfg.prompt.batch_size)
        args.max_batch_size = cfg.prompt.batch_size
    bench = cfg.benchmark
    if bench.enabled and not (bench.kind == "serve" and bench.url):  # a remote server has its own limits
        largest = max([bench.bs, *bench.batch_sizes]) if bench.kind == "offline" else bench.max_concurrency
        if largest is not None and largest > args.max_batch_size:
            log.info("args.max_batch_size raised from %d to the benchmark's batch size %d", args.max_batch_size, largest)
            args.max_batch_size = largest
        if bench.isl + bench.osl > args.max_seq_len:
            log.info("args.max_seq_len raised from %d to benchmark isl+osl=%d", args.max_seq_len, bench.isl + bench.osl)
            args.max_seq_len = bench.isl + bench.osl


def validate_transforms(cfg: DictConfig) -> None:
    """Check every transform name and option against the registry (imports the transform library)."""
    from autodeploy.transforms.optimizer import plan_pipeline

    try:
        plan_pipeline(OmegaConf.to_container(cfg.args.transforms, resolve=True))
    except (KeyError, ValueError) as e:
        raise ConfigError(str(e).strip("'\"")) from None
