"""Cached (paged) attention backends behind one interface.

Every backend provides one op with the signature in docs/architecture.md
(``autodeploy::<name>_cached_attention``). ``get_backend(name)`` checks availability and raises a
clear error (naming the missing extra) before any model work when a backend cannot run here.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass
class AttentionBackend:
    name: str
    module: str  # imported lazily, registers the op
    op_name: str  # attribute of torch.ops.autodeploy
    # () -> None; raises RuntimeError naming what is missing (no GPU, no flashinfer extra, ...)
    check_available: Callable[[], None]
    # optional host-side per-step planning: prepare(metadata) -> None (flashinfer plans here)
    prepare: Optional[Callable[[Any], None]] = None

    def op(self):
        importlib.import_module(self.module)
        import torch

        return getattr(torch.ops.autodeploy, self.op_name).default


BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> AttentionBackend:
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> AttentionBackend:
    _load_builtin()
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, BACKENDS, n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown attention backend {name!r}{hint} (known: {', '.join(sorted(BACKENDS))})")
    backend = BACKENDS[name]
    backend.check_available()
    return backend


def _load_builtin() -> None:
    # each backend module registers itself; importing them is cheap (kernels load lazily)
    for mod in ("torch_backend", "triton_backend", "flashinfer_backend"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
