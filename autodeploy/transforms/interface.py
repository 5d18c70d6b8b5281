"""The transform contract: stages, typed configs, the registry and the per-run context.

A transform is a named, registered class with its own typed config (a dataclass). The YAML key
under ``args.transforms`` is the registry key. The optimizer (``optimizer.py``) sorts transforms
by stage (YAML order decides within a stage), keeps the graph clean and shape-propagated lazily,
and records one ``TransformRecord`` per transform for the run report.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config.schema import AutoDeployArgs


class Stage(enum.IntEnum):
    """Pipeline stages in execution order."""

    FACTORY = 0
    EXPORT = 1
    POST_EXPORT = 2
    PATTERN_MATCHER = 3
    SHARDING = 4
    WEIGHT_LOAD = 5
    POST_LOAD_FUSION = 6
    CACHE_INIT = 7
    COMPILE = 8

    @classmethod
    def parse(cls, value: "str | Stage") -> "Stage":
        if isinstance(value, Stage):
            return value
        try:
            return cls[str(value).upper()]
        except KeyError:
            names = [s.name.lower() for s in cls]
            raise ValueError(f"unknown stage {value!r}; stages in order: {', '.join(names)}") from None

    def __str__(self) -> str:
        return self.name.lower()


@dataclass
class TransformConfig:
    """Fields every transform has. Subclass it (as a dataclass) to add a transform's own options."""

    stage: str = "???"
    enabled: bool = True
    # catch an exception, log it and record the transform as skipped instead of failing the build
    skip_on_error: bool = False
    # run graph cleanup (dead code, no-op nodes, recompile) before this transform if the graph is dirty
    requires_clean_graph: bool = True
    # make sure every node has meta["val"] (fake tensors) before this transform
    requires_shape_prop: bool = False
    # clean up / shape-propagate right after this transform
    run_graph_cleanup: bool = True
    run_shape_prop: bool = False


@dataclass
class TransformInfo:
    """What one application of a transform did."""

    num_matches: int = 0
    skipped: bool = False
    # whether the graph is already clean / has valid shapes after the transform (saves work later)
    is_clean: bool = False
    has_valid_shapes: bool = False
    note: str = ""  # why it was skipped, or a short remark for the report
    # num_matches == 0 means "model unchanged"; a transform that replaces the whole model
    # (build, export, load) reports 1


@dataclass
class TransformRecord:
    """One row of the transform report written to results.json."""

    name: str
    stage: str
    enabled: bool
    skipped: bool = False
    num_matches: int = 0
    time_s: float = 0.0
    mem_change_mb: float = 0.0
    note: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TransformError(RuntimeError):
    """A transform failed; the message names the transform, its stage and the model class."""


@dataclass
class BuildContext:
    """Everything a transform may read or write besides the model itself.

    ``args`` is the experiment's typed ``args`` (``AutoDeployArgs``);
    ``factory`` builds the model and loads weights; ``cache`` is the runtime's cached-sequence
    interface (set before cache_init); ``shared`` carries state between transforms (e.g. the
    sharding plan between detect and apply).
    """

    args: AutoDeployArgs = field(default_factory=AutoDeployArgs)
    factory: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    rank: int = 0
    world_size: int = 1
    cache: Any = None
    shared: dict[str, Any] = field(default_factory=dict)


class BaseTransform:
    """Subclass, set ``config_class`` and implement ``apply``.

    ``apply`` receives the current model (an ``nn.Module`` before export, a ``GraphModule``
    after) and returns the possibly new model plus a ``TransformInfo``.
    """

    config_class: ClassVar[type[TransformConfig]] = TransformConfig
    name: ClassVar[str] = ""
    # True: works on the exported GraphModule only; before export the optimizer records it skipped
    graph_only: ClassVar[bool] = False

    def __init__(self, config: TransformConfig):
        self.config = config

    def apply(self, model: nn.Module, ctx: BuildContext) -> tuple[nn.Module, TransformInfo]:
        raise NotImplementedError


TRANSFORMS: dict[str, type[BaseTransform]] = {}


def register(name: str):
    """Class decorator: ``@register("match_rope_pattern")``; the name is the YAML key."""

    def deco(cls: type[BaseTransform]) -> type[BaseTransform]:
        if name in TRANSFORMS and TRANSFORMS[name] is not cls:
            raise ValueError(f"transform {name!r} registered twice ({TRANSFORMS[name]} and {cls})")
        cls.name = name
        TRANSFORMS[name] = cls
        return cls

    return deco


def get_transform_class(name: str) -> type[BaseTransform]:
    load_library()
    if name not in TRANSFORMS:
        close = difflib.get_close_matches(name, TRANSFORMS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown transform {name!r} in args.transforms{hint} (known: {', '.join(sorted(TRANSFORMS))})")
    return TRANSFORMS[name]


def build_config(name: str, options: dict[str, Any]) -> TransformConfig:
    """Validate a transform's YAML options against its typed config; unknown keys and bad types fail."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cls = get_transform_class(name).config_class
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, options or {})
    except OmegaConfBaseException as e:
        key = getattr(e, "key", None)
        known = [f.name for f in dataclasses.fields(cls)]
        msg = str(e).splitlines()[0]
        if key in known:  # a known option with a value of the wrong type
            raise ValueError(f"args.transforms.{name}.{key}={(options or {}).get(key)!r} is not valid: {msg}") from None
        close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.5) if key else []
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"args.transforms.{name}: {msg}{hint} (options of {name}: {', '.join(known)})"
        ) from None
    if OmegaConf.is_missing(merged, "stage"):
        raise ValueError(f"args.transforms.{name}: 'stage' is required (one of {', '.join(str(s) for s in Stage)})")
    config = OmegaConf.to_object(merged)
    try:
        Stage.parse(config.stage)
    except ValueError as e:
        raise ValueError(f"args.transforms.{name}: {e}") from None
    return config


_LIBRARY_LOADED = False


def load_library() -> None:
    """Import every module of ``transforms/library`` so their ``@register`` calls run."""
    global _LIBRARY_LOADED
    if _LIBRARY_LOADED:
        return
    import importlib
    import pkgutil

    from . import library

    for mod in pkgutil.iter_modules(library.__path__):
        importlib.import_module(f"{library.__name__}.{mod.name}")
    _LIBRARY_LOADED = True
