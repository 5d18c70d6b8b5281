"""Export patches: context managers that make HF code exportable, active only during ``torch.export``.

A patch is a function ``patch(model) -> context manager`` registered under a name, optionally
limited to some HF ``model_type`` values (``config.model_type``)::

    @register_patch("mamba2_ssm_ops", model_types=("mamba2", "nemotron_h", "bamba"))
    @contextlib.contextmanager
    def mamba2_ssm_ops(model):
        ...swap something...
        yield
        ...restore...

``export_patches(model, names=None)`` enters every patch that applies to ``model`` (or only
``names``) and undoes them on exit, so the eager model is left as it was.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator

from torch import nn

from autodeploy.config.errors import UserError


class ExportPatchMismatch(UserError):
    """The installed transformers' code is not what a patch reproduces (one line: family, function, version)."""


@dataclass(frozen=True)
class ExportPatch:
    name: str
    enter: Callable[[nn.Module], ContextManager]
    model_types: tuple[str, ...] | None  # None: every model

    def applies_to(self, model: nn.Module) -> bool:
        if self.model_types is None:
            return True
        return model_type_of(model) in self.model_types


PATCHES: dict[str, ExportPatch] = {}


def register_patch(name: str, model_types: Iterable[str] | None = None):
    """Register ``fn(model) -> context manager`` as export patch ``name``."""

    def deco(fn: Callable[[nn.Module], ContextManager]):
        if name in PATCHES and PATCHES[name].enter is not fn:
            raise ValueError(f"export patch {name!r} registered twice")
        PATCHES[name] = ExportPatch(name, fn, tuple(model_types) if model_types is not None else None)
        return fn

    return deco


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def get_patch(name: str) -> ExportPatch:
    _load_builtin()
    if name not in PATCHES:
        close = difflib.get_close_matches(name, PATCHES, n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown export patch {name!r}{hint} (known: {', '.join(sorted(PATCHES))})")
    return PATCHES[name]


def patches_for(model: nn.Module, names: Iterable[str] | None = None) -> list[ExportPatch]:
    """The patches to apply: ``names`` (all of them, even if their model types differ) or every applicable one."""
    _load_builtin()
    if names is not None:
        return [get_patch(n) for n in names]
    return [p for p in PATCHES.values() if p.applies_to(model)]


@contextlib.contextmanager
def export_patches(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[list[str]]:
    """Apply the selected patches for the duration of the block; yields their names."""
    selected = patches_for(model, names)
    with contextlib.ExitStack() as stack:
        for patch in selected:
            stack.enter_context(patch.enter(model))
        yield [p.name for p in selected]


_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    _LOADED = True
