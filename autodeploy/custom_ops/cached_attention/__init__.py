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

# the canonical op's optional variant arguments, in signature order after ``scale``; every cached op
# takes them in this order too
ATTENTION_VARIANTS = ("sliding_window", "logit_cap", "sinks", "alibi_slopes", "attention_chunk_size")
_VARIANT_WORDS = {"sinks": "attention sinks", "alibi_slopes": "ALiBi", "attention_chunk_size": "chunked attention",
                  "sliding_window": "a sliding window", "logit_cap": "logit soft-capping"}


@dataclass
class AttentionBackend:
    name: str
    module: str  # imported lazily, registers the op
    op_name: str  # attribute of torch.ops.autodeploy
    # () -> None; raises RuntimeError naming what is missing (no GPU, no flashinfer extra, ...)
    check_available: Callable[[], None]
    # optional host-side per-step planning: prepare(metadata) -> None (flashinfer plans here)
    prepare: Optional[Callable[[Any], None]] = None
    # the ATTENTION_VARIANTS the op implements; a layer using another one fails the build
    variants: frozenset = frozenset(ATTENTION_VARIANTS)

    def op(self):
        importlib.import_module(self.module)
        import torch

        return getattr(torch.ops.autodeploy, self.op_name).default

    def check_features(self, layer: str, args: dict[str, Any]) -> None:
        """Raise if attention ``layer`` uses a variant (an argument that is set) this backend lacks."""
        missing = [name for name, value in args.items() if value is not None and name not in self.variants]
        if missing:
            others = sorted(n for n, b in BACKENDS.items() if all(m in b.variants for m in missing))
            raise ValueError(
                f"attention backend {self.name!r} does not support {', '.join(_VARIANT_WORDS[m] for m in missing)} "
                f"(attention {layer}); use backend={' or backend='.join(others)}"
            )


BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> AttentionBackend:
    BACKENDS[backend.name] = backend
    return backend


def check_name(name: str) -> None:
    """A known backend's name (whether it runs here is ``get_backend``'s question)."""
    _load_builtin()
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, BACKENDS, n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown attention backend {name!r}{hint} (known: {', '.join(sorted(BACKENDS))})")


def get_backend(name: str) -> AttentionBackend:
    check_name(name)
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
