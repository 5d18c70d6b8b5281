"""FP8 checkpoints and on-the-fly FP8: which weights are FP8, and how their tensors load.

Checkpoint formats (``checkpoint_scheme``):
- HF ``quantization_config`` with ``quant_method: fp8`` (config.json): FP8 ``<module>.weight`` and
  ``<module>.weight_scale_inv``, one value per tensor (``weight_block_size: null``) or per block of
  ``weight_block_size`` (128x128); ``activation_scheme: static`` adds ``<module>.activation_scale``;
- ModelOpt (``hf_quant_config.json``, or ``quantization_config`` with ``quant_method: modelopt``),
  ``quant_algo: FP8``: ``<module>.weight``, ``<module>.weight_scale`` and ``<module>.input_scale``
  per tensor; its ``exclude_modules`` stay 16-bit.
A module is FP8 when the checkpoint holds its weight scale (the exclusion lists are only reported).
MoE experts stored one per expert (``experts.<e>.w1.weight`` and its scale) are stacked like their
weights (``SafetensorsCheckpoint.pieces``); experts stored fused keep their fused scale.

Scales load in one of the two layouts of ``autodeploy::fp8_linear`` (``custom_ops/fp8_linear.py``):
per channel (a per-tensor scale is expanded to every row; gate and up of fused experts each keep
theirs) or blocks. A rank's share follows the slices of its weight (``scale_slices``).

On the fly (``quantize_fp8.on_the_fly``): the 16-bit weight is read as the loader would (checkpoint
or random init, the rank's slice) and quantized on the device per channel (amax / 448).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config.errors import ConfigError
from ..custom_ops.fp8_linear import FP8, quantize_per_channel
from .checkpoint import SliceSpec, normalize_slices
from .materialize import slice_tensor


@dataclass(frozen=True)
class Fp8Scheme:
    """How a checkpoint stores its FP8 modules."""

    kind: str  # "hf" | "modelopt"
    block_size: Optional[tuple[int, int]]  # HF's weight_block_size; None: one scale per tensor
    scale_name: str  # the weight scale's key beside "weight": weight_scale_inv | weight_scale
    input_name: Optional[str]  # static activation scales: activation_scale | input_scale; None: dynamic
    exclude: tuple[str, ...] = ()  # modules the config says stay 16-bit (reported only)

    def describe(self) -> str:
        layout = f"{list(self.block_size)} blocks" if self.block_size else "per-tensor scales"
        inputs = "static input scales" if self.input_name else "dynamic activations"
        return f"{self.kind} fp8 checkpoint ({layout}, {inputs})"


def _as_dict(config: Any) -> Optional[dict]:
    if config is None:
        return None
    if isinstance(config, dict):
        return config
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(vars(config))


def checkpoint_scheme(config: Any, directory: "Path | str | None") -> Optional[Fp8Scheme]:
    """The FP8 scheme of a checkpoint (its config and ``hf_quant_config.json``), None for a
    16-bit one; a ``ConfigError`` for quantization this loader cannot read, naming it."""
    qc = _as_dict(getattr(config, "quantization_config", None))
    modelopt = None
    if directory is not None and (Path(directory) / "hf_quant_config.json").exists():
        path = Path(directory) / "hf_quant_config.json"
        try:
            modelopt = json.loads(path.read_text()).get("quantization") or {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
    elif qc is not None and str(qc.get("quant_method", "")).lower() == "modelopt":
        modelopt = qc
    if modelopt is not None:
        algo = str(modelopt.get("quant_algo") or "")
        if algo.upper() != "FP8":
            raise ConfigError(f"ModelOpt checkpoint with quant_algo={algo or None!r}: only FP8 (per-tensor) is "
                              "supported")
        exclude = modelopt.get("exclude_modules") or modelopt.get("ignore") or []
        return Fp8Scheme("modelopt", None, "weight_scale", "input_scale", tuple(exclude))
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method != "fp8":
        raise ConfigError(f"checkpoint quantized with quant_method={method or None!r}: supported are fp8 (HF "
                          "quantization_config) and ModelOpt FP8 (hf_quant_config.json)")
    if qc.get("scale_fmt", "float") not in ("float", None) or qc.get("expert_dtype", "fp8") not in ("fp8", None):
        raise ConfigError(f"fp8 checkpoint with scale_fmt={qc.get('scale_fmt')!r}, expert_dtype="
                          f"{qc.get('expert_dtype')!r}: only float scales and fp8 experts are supported")
    block = qc.get("weight_block_size")
    block = (int(block[0]), int(block[1])) if block else None
    static = str(qc.get("activation_scheme", "dynamic")).lower() == "static"
    exclude = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
    return Fp8Scheme("hf", block, "weight_scale_inv", "activation_scale" if static else None, tuple(exclude))


# ---- scales in the op's layouts -------------------------------------------------------------


def canonical_scale(scale: torch.Tensor, rows: int, cols: int, block_size: Optional[tuple[int, int]],
                    where: str) -> torch.Tensor:
    """A stored weight scale -> per channel ``[rows]`` (one value, or one per row group, expanded)
    or blocks ``[ceil(rows/bn), ceil(cols/bk)]``; float32."""
    scale = scale.float()
    if block_size is not None:
        bn, bk = block_size
        want = [-(-rows // bn), -(-cols // bk)]
        if list(scale.shape) == want:
            return scale
        if scale.numel() != 1:
            raise ConfigError(f"{where}: scale of shape {list(scale.shape)} does not fit a [{rows}, {cols}] weight "
                              f"in {list(block_size)} blocks (expected {want})")
    flat = scale.reshape(-1)
    if rows % flat.numel():
        raise ConfigError(f"{where}: {flat.numel()} scale values do not divide the weight's {rows} rows")
    return flat.repeat_interleave(rows // flat.numel())


def scale_slices(weight_spec: SliceSpec, weight_ndim: int, block_size: Optional[tuple[int, int]],
                 weight_shape: list[int], where: str) -> Optional[list[tuple[int, int, int]]]:
    """The slices of a scale (op layout) that go with the slices of its weight: ranges over the
    leading dims (experts) and the rows carry over, ranges over K only for blocks; block ranges
    must start and end on block edges."""
    ranges = normalize_slices(weight_spec)
    if not ranges:
        return None
    rows_dim = weight_ndim - 2
    out = []
    for dim, start, stop in ranges:
        dim %= weight_ndim
        if dim < rows_dim or (dim == rows_dim and block_size is None):
            out.append((dim, start, stop))
        elif block_size is None:
            continue  # per-channel scales hold every column's rows: a split of K keeps them whole
        else:
            unit = block_size[dim - rows_dim]
            if start % unit or (stop % unit and stop != weight_shape[dim]):
                raise ConfigError(f"{where}: the rank's slice [{start}, {stop}) of dim {dim} does not fall on the "
                                  f"fp8 scale blocks of {unit}; use a sharding that splits on multiples of {unit}")
            out.append((dim, start // unit, -(-stop // unit)))
    return out or None


# ---- load sources (``ModelFactory.load_weights(sources=...)``) -------------------------------

Source = Callable[[Any], torch.Tensor]  # reader (factory.WeightReader) -> the tensor to load


def checkpoint_scale_source(scheme: Fp8Scheme, weight_key: str, full_shape: list[int], weight_spec: SliceSpec,
                            pieces: Optional[list[tuple[str, int, int]]] = None) -> Source:
    """The weight scale of ``weight_key`` (full shape ``[..., rows, cols]``), in the op's layout
    and the rank's slice. ``pieces``: (checkpoint key, part, expert) of experts stored one by one."""
    block = scheme.block_size
    slices = scale_slices(weight_spec, len(full_shape), block, full_shape, weight_key)

    def load(reader) -> torch.Tensor:
        ckpt = reader.checkpoint
        if pieces is None:
            full = _scale_of(ckpt.read(scale_key(weight_key, scheme)), full_shape, block, weight_key)
        else:
            full = _stacked_scale(ckpt, pieces, scheme, weight_key)
        return slice_tensor(full, slices).contiguous().to(reader.device)

    return load


def scale_key(weight_key: str, scheme: Fp8Scheme) -> str:
    return weight_key[: -len("weight")] + scheme.scale_name if weight_key.endswith("weight") else (
        f"{weight_key}_{scheme.scale_name.removeprefix('weight_')}")


def _scale_of(scale: torch.Tensor, full_shape: list[int], block, where: str) -> torch.Tensor:
    """A stored scale in op layout; for a weight with leading dims (fused experts), per expert."""
    lead, (rows, cols) = full_shape[:-2], full_shape[-2:]
    if not lead:
        return canonical_scale(scale, rows, cols, block, where)
    count = int(torch.tensor(lead).prod())
    if list(scale.shape[: len(lead)]) == list(lead):
        per = scale.reshape(count, *scale.shape[len(lead):])
    elif scale.numel() == 1:
        per = scale.reshape(1).expand(count)
    else:
        raise ConfigError(f"{where}: scale of shape {list(scale.shape)} does not fit the weight {full_shape}")
    out = torch.stack([canonical_scale(s, rows, cols, block, where) for s in per])
    return out.reshape(*lead, *out.shape[1:])


def _stacked_scale(ckpt, pieces, scheme: Fp8Scheme, where: str) -> torch.Tensor:
    """Scales of experts stored one per expert (gate and up apart), stacked like their weights
    (``[E, rows]`` or ``[E, rows/bn, cols/bk]``); gate and up each keep their own scale."""
    by_expert: dict[int, list[tuple[int, str]]] = {}
    for key, part, expert in pieces:
        by_expert.setdefault(expert, []).append((part, key))
    per_expert = []
    for expert in range(max(by_expert) + 1):
        parts = sorted(by_expert.get(expert, []))
        scales = []
        for _, key in parts:
            rows, cols = ckpt.key_shape(key)
            if scheme.block_size is not None and len(parts) > 1 and rows % scheme.block_size[0]:
                raise ConfigError(f"{where}: fused gate/up experts need whole fp8 blocks of {scheme.block_size[0]} rows")
            scales.append(canonical_scale(ckpt.read_key(scale_key(key, scheme)), rows, cols, scheme.block_size, key))
        per_expert.append(torch.cat(scales, dim=0))
    return torch.stack(per_expert)


def static_input_source(scheme: Fp8Scheme, weight_key: str) -> Source:
    key = weight_key[: -len("weight")] + scheme.input_name

    def load(reader) -> torch.Tensor:
        return reader.checkpoint.read(key).float().reshape(()).to(reader.device)

    return load


def on_the_fly_sources(weight_key: str, weight_spec: SliceSpec, dtype: torch.dtype) -> tuple[Source, Source]:
    """(weight, scale) sources that quantize the 16-bit weight per channel on the device; whichever
    loads first quantizes, the other takes its half."""
    done: dict[str, torch.Tensor] = {}

    def quantize(reader) -> None:
        if not done:
            w = reader.read(weight_key, weight_spec, dtype)
            done["q"], done["scale"] = quantize_per_channel(w)
            del w

    def weight(reader) -> torch.Tensor:
        quantize(reader)
        return done.pop("q")

    def scale(reader) -> torch.Tensor:
        quantize(reader)
        return done.pop("scale")

    return weight, scale


def meta_param(shape, dtype: torch.dtype = FP8) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
