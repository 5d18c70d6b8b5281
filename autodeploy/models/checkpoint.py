"""Streaming reads from a safetensors checkpoint: one tensor (or one slice of it) at a time.

``SafetensorsCheckpoint(dir, conversions)`` indexes the checkpoint (``model.safetensors.index.json``
or single/multiple ``*.safetensors`` files) without reading any data, maps checkpoint keys to model
keys, and ``read(model_key, slice_spec)`` returns just the requested part of a tensor.

Key mapping. Most checkpoints store the model's own state-dict keys. Where transformers 5 stores a
tensor differently from the hub checkpoint (renamed prefixes such as NemotronH's ``backbone.``, or
MoE experts saved one per expert but held as one fused 3-D parameter), we use transformers' own
conversion mapping (``get_model_conversion_mapping``): its renamings are applied to the keys, and
converters made of ``MergeModulelist`` (stack experts) and ``Concatenate`` (e.g. gate|up) are
reassembled here piece by piece, reading only the pieces that overlap the requested slice. Other
converter operations raise ``UnsupportedCheckpointLayout`` naming the converter.

Slice spec (``slices[fqn]`` of ``load_weights``): ``(dim, start, stop)`` reads ``t.narrow(dim,
start, stop - start)``; a list of such tuples reads each range and concatenates the ranges of one
dim in order (a rank's share of a fused tensor such as gate|up); ranges on different dims combine
(a rank's experts, and within each its share of the intermediate dim).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import torch

SliceRange = tuple[int, int, int]
SliceSpec = Union[SliceRange, Sequence[SliceRange], None]


class CheckpointError(RuntimeError):
    """A checkpoint file or key is missing, or a tensor does not fit the model."""


class UnsupportedCheckpointLayout(CheckpointError):
    """The checkpoint stores a tensor in a layout this loader cannot reassemble."""


@dataclass(frozen=True)
class _Piece:
    """One checkpoint tensor that fills part of a fused model tensor."""

    key: str
    pattern_idx: int  # which source pattern (its place in the concatenation)
    expert: int  # index along the stacking dim


@dataclass
class _Fused:
    """A model tensor assembled from many checkpoint tensors (stack experts, then concatenate)."""

    pieces: list[_Piece]
    stack_dim: int
    concat_dim: int | None
    converter: str  # repr, for error messages


@dataclass
class _Unsupported:
    converter: str
    keys: list[str]


def normalize_slices(spec: SliceSpec) -> list[SliceRange] | None:
    if spec is None:
        return None
    if len(spec) == 3 and all(isinstance(v, int) for v in spec):
        return [tuple(spec)]  # type: ignore[list-item]
    ranges = [tuple(r) for r in spec]  # type: ignore[union-attr]
    if not ranges or any(len(r) != 3 or not all(isinstance(v, int) for v in r) for r in ranges):
        raise ValueError(f"slice spec must be (dim, start, stop) or a list of those, got {spec!r}")
    return ranges  # type: ignore[return-value]


def read_ranges(ranges: Sequence[SliceRange], ndim: int, read_box: Callable[[dict[int, tuple[int, int]]], torch.Tensor]
                ) -> torch.Tensor:
    """Assemble the slice ``ranges`` describe from boxes read one at a time: ranges on one dim are
    concatenated in order, ranges on different dims combine (e.g. a rank's experts, and within
    them its rows of gate and of up)."""
    by_dim: dict[int, list[tuple[int, int]]] = {}
    for dim, start, stop in ranges:
        by_dim.setdefault(dim % ndim, []).append((start, stop))
    dims = sorted(by_dim.items())

    def build(i: int, box: dict[int, tuple[int, int]]) -> torch.Tensor:
        if i == len(dims):
            return read_box(box)
        dim, spans = dims[i]
        parts = [build(i + 1, {**box, dim: span}) for span in spans]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    return build(0, {})


def find_checkpoint_files(directory: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file holding it (reads headers only)."""
    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {name: directory / name for name in set(weight_map.values())}
        missing = sorted(str(p) for p in files.values() if not p.exists())
        if missing:
            raise CheckpointError(f"checkpoint shard(s) listed in {index_path} are missing: {', '.join(missing)}")
        return {key: files[name] for key, name in weight_map.items()}
    shard_files = sorted(directory.glob("*.safetensors"))
    if not shard_files:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(others)}: only safetensors checkpoints are supported)" if others else ""
        raise CheckpointError(f"no safetensors checkpoint (model.safetensors or an index) in {directory}{hint}")
    key_to_file: dict[str, Path] = {}
    for path in shard_files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                key_to_file[key] = path
    return key_to_file


class SafetensorsCheckpoint:
    """Read model tensors (or slices) from a safetensors checkpoint, one at a time."""

    def __init__(self, directory: "str | Path", conversions: Iterable[Any] | None = None, base_model_prefix: str = ""):
        self.directory = Path(directory)
        self._key_to_file = find_checkpoint_files(self.directory)
        self._handles: dict[Path, Any] = {}
        self._direct: dict[str, str] = {}  # model key -> checkpoint key
        self._fused: dict[str, _Fused] = {}
        self._unsupported: dict[str, _Unsupported] = {}
        self._base_model_prefix = base_model_prefix
        self._map_keys(list(conversions or []))

    # ----- key mapping -------------------------------------------------------------------------
    def _map_keys(self, conversions: list[Any]) -> None:
        renamings, converters = _split_conversions(conversions)
        for ckpt_key in self._key_to_file:
            key = ckpt_key
            for renaming in renamings:
                key, _ = renaming.rename_source_key(key)
            matched = None
            for converter in converters:
                target, pattern = converter.rename_source_key(key)
                if pattern is not None:
                    matched = (converter, target, pattern)
                    break
            if matched is None:
                self._direct.setdefault(key, ckpt_key)
                continue
            converter, target, pattern = matched
            self._add_fused_piece(converter, target, pattern, key, ckpt_key)

    def _add_fused_piece(self, converter: Any, target: str, pattern: str, renamed: str, ckpt_key: str) -> None:
        layout = _stack_concat_layout(converter)
        expert = _expert_index(pattern, renamed) if layout is not None else None
        if layout is None or expert is None:
            # every model key this converter produces (one-to-many converters name the first one)
            targets = list(getattr(converter, "target_patterns", []))
            for other in [target] + [target.replace(targets[0], t, 1) for t in targets[1:]]:
                entry = self._unsupported.setdefault(other, _Unsupported(_describe(converter), []))
                entry.keys.append(ckpt_key)
            return
        stack_dim, concat_dim = layout
        fused = self._fused.setdefault(target, _Fused([], stack_dim, concat_dim, _describe(converter)))
        fused.pieces.append(_Piece(ckpt_key, list(converter.source_patterns).index(pattern), expert))

    def resolve(self, model_key: str) -> str | None:
        """The key under which the checkpoint holds ``model_key`` (after renaming), or None."""
        for candidate in self._candidates(model_key):
            if candidate in self._direct or candidate in self._fused or candidate in self._unsupported:
                return candidate
        return None

    def _candidates(self, model_key: str) -> list[str]:
        # a ForCausalLM model may be loaded from base-model weights (no "model." prefix) and vice versa
        out = [model_key]
        prefix = self._base_model_prefix
        if prefix:
            if model_key.startswith(prefix + "."):
                out.append(model_key[len(prefix) + 1 :])
            else:
                out.append(f"{prefix}.{model_key}")
        return out

    def __contains__(self, model_key: str) -> bool:
        return self.resolve(model_key) is not None

    # ----- reading -----------------------------------------------------------------------------
    def shape(self, model_key: str) -> list[int]:
        key = self._require(model_key)
        if key in self._direct:
            return list(self._open(self._direct[key]).get_shape())
        return self._fused_layout(self._fused[key])[0]

    def read(self, model_key: str, spec: SliceSpec = None, dtype: torch.dtype | None = None,
             device: "torch.device | str" = "cpu") -> torch.Tensor:
        """Read ``model_key`` (only the ranges in ``spec``) and return it on ``device`` in ``dtype``."""
        key = self._require(model_key)
        ranges = normalize_slices(spec)
        if key in self._direct:
            tensor = self._read_direct(self._direct[key], ranges)
        else:
            tensor = self._read_fused(key, self._fused[key], ranges)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def pieces(self, model_key: str) -> list[tuple[str, int, int]] | None:
        """(checkpoint key, source pattern index, expert) of each tensor a fused model tensor is
        stacked from (experts stored one by one); None for a tensor stored whole."""
        fused = self._fused.get(self._require(model_key))
        return None if fused is None else [(p.key, p.pattern_idx, p.expert) for p in fused.pieces]

    def has_key(self, ckpt_key: str) -> bool:
        """Whether the checkpoint stores a tensor under ``ckpt_key`` (as stored, before any renaming)."""
        return ckpt_key in self._key_to_file

    def key_shape(self, ckpt_key: str) -> list[int]:
        """The shape of a tensor by its checkpoint key (as stored, before any renaming)."""
        return list(self._open(ckpt_key).get_shape())

    def read_key(self, ckpt_key: str, spec: SliceSpec = None) -> torch.Tensor:
        """A tensor by its checkpoint key (as stored, before any renaming), on the CPU."""
        if ckpt_key not in self._key_to_file:
            raise CheckpointError(f"key {ckpt_key!r} not found in checkpoint {self.directory}")
        return self._read_direct(ckpt_key, normalize_slices(spec))

    def _require(self, model_key: str) -> str:
        key = self.resolve(model_key)
        if key is None:
            raise CheckpointError(f"key {model_key!r} not found in checkpoint {self.directory}")
        if key in self._unsupported:
            entry = self._unsupported[key]
            raise UnsupportedCheckpointLayout(
                f"checkpoint layout not supported: model tensor {model_key!r} is built from checkpoint keys "
                f"{entry.keys[:4]}{'...' if len(entry.keys) > 4 else ''} by the transformers conversion "
                f"{entry.converter}; only stacking experts (MergeModulelist) and concatenation are streamed"
            )
        return key

    def _open(self, ckpt_key: str):
        from safetensors import safe_open

        path = self._key_to_file[ckpt_key]
        handle = self._handles.get(path)
        if handle is None:
            if not path.exists():
                raise CheckpointError(f"checkpoint file {path} is missing")
            handle = safe_open(str(path), framework="pt", device="cpu")
            self._handles[path] = handle
        return handle.get_slice(ckpt_key)

    def _read_direct(self, ckpt_key: str, ranges: list[SliceRange] | None) -> torch.Tensor:
        view = self._open(ckpt_key)
        if not ranges:
            return view[...]  # the whole tensor; unlike [:] this also reads 0-dim tensors (scalar parameters)
        ndim = len(view.get_shape())

        def box(spans: dict[int, tuple[int, int]]) -> torch.Tensor:
            return view[tuple(slice(*spans[d]) if d in spans else slice(None) for d in range(ndim))]

        return read_ranges(ranges, ndim, box)

    def _fused_layout(self, fused: _Fused) -> tuple[list[int], dict[int, tuple[int, int]], list[int]]:
        """Full shape of the fused tensor, each pattern's (offset, size) along concat_dim, piece shape."""
        num_experts = max(p.expert for p in fused.pieces) + 1
        piece_shape = list(self._open(fused.pieces[0].key).get_shape())
        stacked = piece_shape[: fused.stack_dim] + [num_experts] + piece_shape[fused.stack_dim :]
        offsets: dict[int, tuple[int, int]] = {}
        if fused.concat_dim is None:
            return stacked, offsets, piece_shape
        offset = 0
        for idx in sorted({p.pattern_idx for p in fused.pieces}):
            key = next(p.key for p in fused.pieces if p.pattern_idx == idx)
            shape = list(self._open(key).get_shape())
            size = (shape[: fused.stack_dim] + [num_experts] + shape[fused.stack_dim :])[fused.concat_dim]
            offsets[idx] = (offset, size)
            offset += size
        full = list(stacked)
        full[fused.concat_dim] = offset
        return full, offsets, piece_shape

    def _read_fused(self, model_key: str, fused: _Fused, ranges: list[SliceRange] | None) -> torch.Tensor:
        full_shape, offsets, _ = self._fused_layout(fused)
        ndim = len(full_shape)
        return read_ranges(ranges or [(0, 0, full_shape[0])], ndim,
                           lambda box: self._read_fused_box(fused, full_shape, offsets, box))

    def _read_fused_box(self, fused: _Fused, full_shape: list[int], offsets: dict[int, tuple[int, int]],
                        box: dict[int, tuple[int, int]]) -> torch.Tensor:
        """The part ``box`` (dim -> [start, stop); other dims whole) of a tensor stacked from
        per-expert pieces (and concatenated from several patterns), reading only what overlaps."""
        ndim = len(full_shape)
        span = [box.get(d, (0, full_shape[d])) for d in range(ndim)]
        out_shape = [b - a for a, b in span]
        out: torch.Tensor | None = None
        filled = 0
        for piece in fused.pieces:
            src_index: list[Any] = []
            dst_index: list[Any] = []
            for d in range(ndim):
                if d == fused.stack_dim:
                    lo, hi, off = piece.expert, piece.expert + 1, 0
                elif d == fused.concat_dim:
                    off, size = offsets[piece.pattern_idx]
                    lo, hi = off, off + size
                else:
                    lo, hi, off = 0, full_shape[d], 0
                lo, hi = max(lo, span[d][0]), min(hi, span[d][1])
                if lo >= hi:
                    break
                if d == fused.stack_dim:
                    dst_index.append(piece.expert - span[d][0])
                else:
                    src_index.append(slice(lo - off, hi - off))
                    dst_index.append(slice(lo - span[d][0], hi - span[d][0]))
            else:
                src = self._open(piece.key)[tuple(src_index)]
                if out is None:
                    out = torch.empty(out_shape, dtype=src.dtype)
                out[tuple(dst_index)] = src
                filled += src.numel()
        if out is None or filled != out.numel():
            raise CheckpointError(
                f"checkpoint pieces for a fused tensor do not cover {span} "
                f"(converter {fused.converter}, pieces {[p.key for p in fused.pieces[:4]]}...)"
            )
        return out

    def close(self) -> None:
        self._handles.clear()


def _split_conversions(conversions: list[Any]) -> tuple[list[Any], list[Any]]:
    try:
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # pragma: no cover - transformers without the conversion API
        return [], []
    renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    return renamings, converters


def _describe(converter: Any) -> str:
    ops = ", ".join(type(op).__name__ for op in getattr(converter, "operations", []))
    return f"{converter!r} with operations [{ops}]"


def _stack_concat_layout(converter: Any) -> tuple[int, int | None] | None:
    """(stack_dim, concat_dim) if the converter only stacks experts and concatenates, else None."""
    ops = list(getattr(converter, "operations", []))
    names = [type(op).__name__ for op in ops]
    if len(getattr(converter, "target_patterns", [])) != 1:
        return None
    if names == ["MergeModulelist"] and len(converter.source_patterns) == 1:
        return ops[0].dim, None
    if names == ["MergeModulelist", "Concatenate"]:
        return ops[0].dim, ops[1].dim
    return None


def _expert_index(pattern: str, key: str) -> int | None:
    """The number that stands for ``*`` in ``pattern`` (e.g. ``.experts.*.w1.weight``) within ``key``."""
    if pattern.count("*") != 1:
        return None
    before, after = pattern.split("*")
    regex = re.escape(before.lstrip("^")) + r"(\d+)" + re.escape(after)
    match = re.search(regex, key)
    return int(match.group(1)) if match else None
