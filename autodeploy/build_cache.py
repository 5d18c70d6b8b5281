"""The build cache: a second build of the same model and config skips the deterministic front of
the pipeline, and torch's compile caches persist beside it.

What is cached: the graph as it leaves the ``sharding`` stage (exported, cleaned, matched, sharded,
still on ``meta``: no weights), pickled with torch's ``GraphPickler`` (node metadata and symbolic
shapes included), with what those stages left in ``ctx.shared`` (the sharding plan and the loader's
slices) and their report rows, and what the factory recorded when it built the HF model on meta
(parameter shapes, tied names, buffer values: ``load_weights`` needs them, so a hit never builds
the HF model nor imports its modeling code). A hit starts the pipeline at ``weight_load``.
torch's inductor caches (FX graph cache, AOTAutograd cache, kernel autotuning) go to
``<dir>/torch/inductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set: they serve ``compile_model``
the next time.

The key covers everything the cached graph depends on: the model (its config with ``model_kwargs``
applied; the checkpoint's file names, sizes and times), the whole resolved ``args``, the rank and
world size, the device type, our code (a hash of every ``.py`` file of the package) and the
library versions (torch, transformers, triton, python). Any change misses.

Location and switch: ``AUTODEPLOY_BUILD_CACHE`` unset or ``1``: ``$AUTODEPLOY_CACHE/build`` (default
``~/.cache/autodeploy/build``); ``0`` / ``off``: no cache; any other value: that directory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

ENV = "AUTODEPLOY_BUILD_CACHE"
FORMAT = 3  # bump when what an entry holds changes
PACKAGE_DIR = Path(__file__).resolve().parent


def cache_dir() -> Optional[Path]:
    """The build cache's directory, or None when it is off (``AUTODEPLOY_BUILD_CACHE``)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("0", "off", "false", "no"):
        return None
    if value.lower() in ("", "1", "on", "true", "yes"):
        from .models.tiny import cache_root

        return cache_root() / "build"
    return Path(value).expanduser()


@functools.lru_cache(maxsize=None)
def source_hash(root: Path = PACKAGE_DIR) -> str:
    """sha256 of every ``.py`` file under ``root`` (relative path and bytes), in path order."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def library_versions() -> dict[str, Optional[str]]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": platform.python_version()}


def _checkpoint_files(factory: Any) -> Any:
    """Names, sizes and times of the checkpoint's files (a directory's, or one file such as a GGUF);
    a hub id as it is."""
    location = Path(factory.source.local_dir or factory.source.location)
    if location.is_file():
        return [(location.name, location.stat().st_size, location.stat().st_mtime_ns)]
    if not location.is_dir():
        return factory.source.location
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(location.iterdir())
            if p.suffix in (".safetensors", ".json", ".gguf") and p.is_file()]


def enable_torch_caches(directory: Path) -> None:
    """inductor's caches under ``directory`` unless the user placed them (read at each compile)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(directory / "torch" / "inductor"))


@dataclass
class Restored:
    model: torch.fx.GraphModule
    shared: dict[str, Any]
    records: list[Any]  # TransformRecord rows of the skipped transforms
    is_clean: bool
    has_valid_shapes: bool
    factory_record: Any = None  # ModelFactory.build_record (None: the factory builds it again)


class BuildCache:
    """One build's entry: ``load`` (None on a miss) before the pipeline, ``save`` after ``sharding``."""

    def __init__(self, directory: Path, inputs: dict[str, Any]):
        self.inputs = inputs
        self.key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        self.path = Path(directory) / self.key[:32]

    @classmethod
    def for_build(cls, ctx: Any) -> Optional["BuildCache"]:
        """The entry of the build ``ctx`` describes, or None when the cache is off."""
        directory = cache_dir()
        if directory is None or ctx.factory is None:
            return None
        try:
            from torch.fx._graph_pickler import GraphPickler  # noqa: F401  (torch >= 2.7)
        except ImportError:
            log.warning("build cache: torch %s has no torch.fx._graph_pickler; building from scratch", torch.__version__)
            return None
        args = dataclasses.asdict(ctx.args)
        factory = ctx.factory
        inputs = {
            "format": FORMAT, "code": source_hash(), "versions": library_versions(), "args": args,
            "model": {"config": factory.config.to_dict(), "checkpoint": _checkpoint_files(factory)},
            "rank": ctx.rank, "world_size": ctx.world_size, "device": torch.device(ctx.device).type,
        }
        enable_torch_caches(directory)
        return cls(directory, inputs)

    def load(self) -> Optional[Restored]:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        graph_file = self.path / "graph.pkl"
        if not graph_file.exists():
            return None
        try:
            state = pickle.loads((self.path / "state.pkl").read_bytes())
            model = GraphPickler.loads(graph_file.read_bytes(), FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()))
        except Exception as e:  # noqa: BLE001 - a broken entry is a miss, and is rebuilt
            log.warning("build cache entry %s unreadable (%s: %s): building from scratch", self.path, type(e).__name__, e)
            return None
        record = state.get("factory_record")
        return Restored(model, state["shared"], state["records"], state["is_clean"], state["has_valid_shapes"],
                        pickle.loads(record) if record is not None else None)

    def save(self, model: torch.fx.GraphModule, shared: dict[str, Any], records: list[Any], is_clean: bool,
             factory_record: Any = None) -> bool:
        """Write the entry (atomically: a concurrent build of the same key reads a whole one or none)."""
        import dataclasses

        from torch.fx._graph_pickler import GraphPickler, Options

        # every op allowed (ours included), every metadata key we keep (fields differ across torch versions)
        names = {f.name for f in dataclasses.fields(Options)}
        options = Options(**{k: None for k in ("ops_filter", "node_metadata_key_filter") if k in names})
        # node values are recomputed after weight_load anyway (the loader invalidates them): only the
        # inputs' (with their symbolic shapes) are kept, which shape propagation starts from; restoring
        # thousands of fake tensors took longer than propagating them again
        kept = {node: node.meta for node in model.graph.nodes}
        try:  # pickled once, on its own: an unpicklable record is only rebuilt on a hit (the HF model again)
            record = pickle.dumps(factory_record) if factory_record is not None else None
        except Exception:  # noqa: BLE001
            record = None
        try:
            for node in model.graph.nodes:
                node.meta = {k: v for k, v in node.meta.items()
                             if k == "nn_module_stack" or (k == "val" and node.op == "placeholder")}
            graph = GraphPickler.dumps(model, options)
            state = pickle.dumps({"shared": dict(shared), "records": list(records), "is_clean": is_clean,
                                  "has_valid_shapes": False, "factory_record": record})
        except Exception as e:  # noqa: BLE001 - an unpicklable graph is built every time, not an error
            log.warning("build cache: cannot pickle the graph (%s: %s); not cached", type(e).__name__, e)
            return False
        finally:
            for node, meta in kept.items():
                node.meta = meta
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "inputs.json").write_text(json.dumps(self.inputs, sort_keys=True, default=str, indent=1))
        for name, data in (("state.pkl", state), ("graph.pkl", graph)):  # graph last: it marks the entry whole
            tmp = self.path / f".{name}.{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, self.path / name)
        return True


