"""ModelFactory: resolve a model name, build the HF model (on meta), the tokenizer, and load weights.

``model`` may be
- a local HF directory (config.json, safetensors shards, tokenizer files);
- a GGUF file, or a directory holding one (config, tokenizer and weights from the file, ``gguf.py``);
- a card name: ``tiny_*`` (built on first use, see ``tiny.py``), a packaged GGUF (``smollm2_135m``:
  the file a Python package ships), or a shape card (``cards/<name>.json``: config only, no weights,
  no tokenizer);
- otherwise a hub id, loaded the ordinary way (``AutoConfig.from_pretrained``,
  ``AutoTokenizer.from_pretrained``, weights through ``huggingface_hub.snapshot_download``).
  Offline (``HF_HUB_OFFLINE=1``) or with the hub unreachable, a hub id resolves to its copy in the
  local HF cache, or fails at once (no retries) when there is none.

A name that is none of these but close to a card (``tiny-llama``) fails with ``did you mean``.

``load_weights`` streams tensors from safetensors one at a time (only the slice a rank needs when
``slices`` is given) straight into the model, which may be the HF module or the exported
GraphModule: both address tensors by the HF state-dict keys.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..config.errors import ConfigError, UserError
from ..config.schema import AutoDeployArgs
from . import cards
from .checkpoint import CheckpointError, SafetensorsCheckpoint, SliceSpec, normalize_slices
from .gguf import find_gguf, open_gguf
from .materialize import (
    ModelTensor,
    model_tensors,
    nonpersistent_buffer_values,
    random_tensor,
    replace_device_literals,
    set_tensor,
    slice_tensor,
)

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# model_kwargs that are build options of transformers rather than config fields
_BUILD_OPTIONS = ("attn_implementation", "experts_implementation")


class ModelResolutionError(UserError):
    """``model`` is neither a local directory, a card, nor loadable from the hub."""


@dataclass
class ModelSource:
    kind: str  # "dir" | "tiny" | "gguf" | "card" | "hub"
    name: str  # what the user passed
    location: str  # a directory, a GGUF file, a card JSON file, or a hub id

    @property
    def local_dir(self) -> Path | None:
        return Path(self.location) if self.kind in ("dir", "tiny") else None


def resolve_model(model: str) -> ModelSource:
    """Decide what ``model`` names (local directory, card, or hub id). Builds tiny models on first use."""
    if not model:
        raise ModelResolutionError("no model given: set model (a local HF directory, a card name or a hub id)")
    path = Path(os.path.expanduser(model))
    if path.is_dir() and not (path / "config.json").exists():
        gguf_file = find_gguf(path)
        if gguf_file is None:
            raise ModelResolutionError(f"model directory {path} has no config.json (nor a .gguf file)")
        return ModelSource("gguf", model, str(gguf_file))
    if path.is_dir():
        return ModelSource("dir", model, str(path))
    if path.is_file() and find_gguf(path) is not None:
        return ModelSource("gguf", model, str(path))
    if cards.is_tiny(model):
        from .tiny import ensure_tiny_model

        return ModelSource("tiny", model, str(ensure_tiny_model(model)))
    if cards.is_packaged(model):
        return ModelSource("gguf", model, str(cards.packaged_gguf(model)))
    card = cards.shape_card_path(model)
    if card is not None:
        return ModelSource("card", model, str(card))
    if path.exists():
        raise ModelResolutionError(
            f"model {model} is a file, not a directory (pass the folder that holds config.json, or a .gguf file)"
        )
    if model.startswith(("/", "./", "../", "~")) or path.suffix == ".json":
        raise ModelResolutionError(f"model directory {model} does not exist")
    close = difflib.get_close_matches(model, cards.card_names(), n=1, cutoff=0.75)
    if close and "/" not in model:
        raise ModelResolutionError(
            f"unknown model {model!r}: did you mean {close[0]}? (cards: {', '.join(cards.card_names())})"
        )
    offline = hub_offline()
    if offline or not hub_reachable():
        cached = _cached_snapshot(model)
        if cached is not None:
            return ModelSource("dir", model, cached)
        why = "HF_HUB_OFFLINE=1" if offline else f"the hub ({_hub_endpoint()}) is unreachable"
        raise ModelResolutionError(
            f"model {model!r} is not a card ({', '.join(cards.card_names())}) nor a local directory, and "
            f"{why} with no cached copy of it: pass --model DIR (a local HF checkpoint) or a card name"
        )
    return ModelSource("hub", model, model)


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub (no retries). Behind a proxy we cannot tell: assume yes."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from urllib.parse import urlparse

    url = urlparse(_hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _cached_snapshot(repo_id: str) -> str | None:
    """The local HF cache's snapshot of ``repo_id`` (what offline transformers would load), or None."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: either way, no copy
        return None
    return path if (Path(path) / "config.json").exists() else None


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (config fields must be plain Python)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def parse_dtype(dtype: "str | torch.dtype | None", config: Any = None) -> torch.dtype:
    """``auto`` -> the config's dtype (float32 if none); else one of float32/bfloat16/float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cfg_dtype = getattr(config, "dtype", None) if config is not None else None
        if cfg_dtype is None:
            cfg_dtype = getattr(config, "torch_dtype", None) if config is not None else None
        if isinstance(cfg_dtype, torch.dtype):
            return cfg_dtype
        if isinstance(cfg_dtype, str) and cfg_dtype.removeprefix("torch.") in DTYPES:
            return DTYPES[cfg_dtype.removeprefix("torch.")]
        return torch.float32
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return DTYPES[key]


def apply_config_overrides(config: Any, overrides: Mapping[str, Any], path: str = "model_kwargs") -> None:
    """Set config fields from ``overrides``; nested sub-configs and dict fields are updated key-wise.

    Unknown fields fail (naming them and the closest known ones) instead of being silently ignored.
    """
    from transformers import PretrainedConfig

    unknown: list[str] = []
    for key, value in overrides.items():
        value = _plain(value)
        where = f"{path}.{key}"
        if key in _BUILD_OPTIONS:
            setattr(config, f"_{key}", value)
            continue
        if key in ("dtype", "torch_dtype"):
            config.dtype = parse_dtype(value)
            continue
        if key == "rope_theta" and not hasattr(config, key) and isinstance(getattr(config, "rope_parameters", None), dict):
            # transformers 5 keeps rope_theta inside rope_parameters; older configs had it top-level
            config.rope_parameters = {**config.rope_parameters, "rope_theta": value}
            continue
        if not hasattr(config, key):
            unknown.append(key)
            continue
        current = getattr(config, key)
        if isinstance(current, PretrainedConfig) and isinstance(value, Mapping):
            apply_config_overrides(current, value, where)
        elif isinstance(current, dict) and isinstance(value, Mapping):
            setattr(config, key, _deep_merge(current, value))
        else:
            setattr(config, key, value)
            readback = getattr(config, key)
            if isinstance(value, (int, float, str, bool)) and readback != value:
                raise ConfigError(
                    f"args.{where}={value!r} has no effect on {type(config).__name__} (it reads back as {readback!r}; "
                    "the field is derived from others)"
                )
    if unknown:
        known = sorted(k for k in config.to_dict() if not k.startswith("_"))
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hints.append(f"args.{path}.{key}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"unknown config field(s) for {type(config).__name__}: {'; '.join(hints)}")
    _fit_layer_types(config, overrides)


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), Mapping) and isinstance(v, Mapping) else _plain(v)
    return out


def _fit_layer_types(config: Any, overrides: Mapping[str, Any]) -> None:
    # fewer layers via num_hidden_layers (the usual quick-test override) must shorten per-layer lists
    if "num_hidden_layers" not in overrides or "layer_types" in overrides:
        return
    n = overrides["num_hidden_layers"]
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > n:
        config.layer_types = layer_types[:n]


class ModelFactory:
    """Builds an HF ``AutoModelForCausalLM`` and loads its weights (the ``AutoModelForCausalLM`` factory)."""

    def __init__(
        self,
        model: str,
        model_kwargs: Mapping[str, Any] | None = None,
        tokenizer: str | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        skip_loading_weights: bool = False,
        max_seq_len: int = 512,
        dtype: "str | torch.dtype" = "auto",
    ):
        self.model = model
        self.model_kwargs = dict(_plain(model_kwargs) or {})
        self.tokenizer = tokenizer
        self.tokenizer_kwargs = dict(_plain(tokenizer_kwargs) or {})
        self.skip_loading_weights = bool(skip_loading_weights)
        self.max_seq_len = int(max_seq_len)
        self.source = resolve_model(model)
        self.config = self._load_config()
        self.dtype = parse_dtype(dtype, self.config)
        self.config.dtype = self.dtype
        self.config.use_cache = False
        archs = getattr(self.config, "architectures", None) or []
        self.model_class_name: str = archs[0] if archs else type(self.config).__name__.replace("Config", "ForCausalLM")
        self._built: _BuildRecord | None = None
        max_pos = getattr(self.config, "max_position_embeddings", None)
        if isinstance(max_pos, int) and self.max_seq_len > max_pos:
            log.warning("max_seq_len=%d exceeds the model's max_position_embeddings=%d", self.max_seq_len, max_pos)

    @classmethod
    def from_args(cls, args: AutoDeployArgs, model: str | None = None) -> "ModelFactory":
        """Build from the experiment's typed ``args``; ``model`` overrides ``args.model``."""
        return cls(model=model or args.model, model_kwargs=args.model_kwargs, tokenizer=args.tokenizer,
                   tokenizer_kwargs=args.tokenizer_kwargs, skip_loading_weights=args.skip_loading_weights,
                   max_seq_len=args.max_seq_len, dtype=args.dtype)

    # ----- config ------------------------------------------------------------------------------
    def _load_config(self):
        from transformers import AutoConfig

        if self.source.kind == "gguf":
            config = open_gguf(self.source.location).config()
            apply_config_overrides(config, self.model_kwargs)
            return config
        try:
            config = AutoConfig.from_pretrained(self.source.location)
        except Exception as e:  # noqa: BLE001 - turned into a message that says what was tried
            if self.source.kind != "hub":
                raise
            raise ModelResolutionError(
                f"model {self.model!r} is not a local directory, not a card ({', '.join(cards.card_names())}), "
                f"and could not be loaded from the hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
        apply_config_overrides(config, self.model_kwargs)
        return config

    # ----- model -------------------------------------------------------------------------------
    def build_model(self, device: "str | torch.device" = "meta") -> nn.Module:
        """The HF model in eval mode, in ``self.dtype``, ``use_cache`` off; parameters on ``device``."""
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        model.eval()
        model.config.use_cache = False
        self.model_class_name = type(model).__name__
        self._built = _BuildRecord.of(model)
        return model

    def check_checkpoint_fits(self, model: nn.Module) -> None:
        """Before export: every parameter of the configured model is in the local checkpoint, in the
        same shape (safetensors headers only). A misfit names the model_kwargs that caused it."""
        if self.skip_loading_weights or self.source.kind not in ("dir", "tiny", "gguf"):
            return  # random weights, or a hub checkpoint (downloaded when the weights are loaded)
        record = self._record()
        try:
            checkpoint = self._open_checkpoint(record)
        except CheckpointError as e:
            raise ConfigError(f"{e}; set args.skip_loading_weights=true for random weights") from None
        mismatched, missing, seen = [], [], set()
        for t in model_tensors(model):
            if not t.is_param or id(t.tensor) in seen:
                continue
            seen.add(id(t.tensor))
            key = next((n for n in [t.fqn, *record.aliases.get(t.fqn, ())] if n in checkpoint), None)
            if key is None:
                missing.append(t.fqn)
                continue
            try:
                shape = checkpoint.shape(key)
            except CheckpointError:  # a layout only load_weights can judge (and will, naming it)
                continue
            if shape != list(t.tensor.shape):
                mismatched.append((t.fqn, list(t.tensor.shape), shape))
        checkpoint.close()
        if mismatched or missing:
            raise ConfigError(self._misfit_message(mismatched, missing))

    def _misfit_message(self, mismatched: list, missing: list[str]) -> str:
        from transformers import AutoConfig

        parts = []
        if mismatched:
            fqn, mine, theirs = mismatched[0]
            more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
            parts.append(f"{fqn} is {mine} here but {theirs} in the checkpoint{more}")
        if missing:
            parts.append(f"{len(missing)} parameter(s) are not in the checkpoint ({missing[0]}, ...)")
        original = (open_gguf(self.source.location).config() if self.source.kind == "gguf"
                    else AutoConfig.from_pretrained(self.source.location))
        changed = {k: (v, getattr(original, k, None)) for k, v in self.model_kwargs.items()
                   if k not in _BUILD_OPTIONS and getattr(original, k, None) != _plain(v)}
        # the keys whose new value shows up where the shapes differ (else every changed key)
        sizes = {mine[i] for _, mine, theirs in mismatched for i in range(min(len(mine), len(theirs)))
                 if mine[i] != theirs[i]}
        culprits = {k: vo for k, vo in changed.items() if vo[0] in sizes}
        if missing:
            culprits.update({k: vo for k, vo in changed.items() if isinstance(vo[0], int) and isinstance(vo[1], int)
                             and vo[0] > vo[1]})
        culprits = culprits or changed
        where = f"checkpoint {self.source.location} does not fit the configured model: {'; '.join(parts)}"
        if not culprits:
            return f"{where} (no model_kwargs changed it: the checkpoint does not match its own config.json)"
        keys = ", ".join(f"args.model_kwargs.{k}={new!r} (checkpoint: {old!r})" for k, (new, old) in culprits.items())
        return f"{where}; changed by {keys}. Set args.skip_loading_weights=true for random weights of the new shape"

    @property
    def build_record(self) -> "_BuildRecord | None":
        """What ``build_model`` recorded (None before it ran); the build cache keeps it, and sets it
        on a hit, so that loading weights needs no HF model."""
        return self._built

    @build_record.setter
    def build_record(self, record: "_BuildRecord") -> None:
        self._built = record

    def _record(self) -> "_BuildRecord":
        if self._built is None:
            self.build_model("meta")
        assert self._built is not None
        return self._built

    def sharding_config(self) -> dict[str, Any] | None:
        """The model's own TP plan (HF ``base_model_tp_plan``) for the ``factory`` sharding source."""
        plan = getattr(self.config, "base_model_tp_plan", None)
        if not plan:
            return None
        heads = getattr(self.config, "num_attention_heads", None)
        head_dim = getattr(self.config, "head_dim", None) or (self.config.hidden_size // heads if heads else None)
        return {"tp_plan": dict(plan), "head_dim": head_dim}

    # ----- tokenizer ---------------------------------------------------------------------------
    def init_tokenizer(self):
        """The tokenizer from ``tokenizer`` or the model directory / hub id; None for shape cards."""
        from transformers import AutoTokenizer

        name = self.tokenizer
        if name is None:
            if self.source.kind == "card":
                return None
            if self.source.kind == "gguf":
                return open_gguf(self.source.location).tokenizer(padding_side="left", **self.tokenizer_kwargs)
            name = self.source.location
        elif cards.is_tiny(name):
            from .tiny import ensure_tiny_model

            name = str(ensure_tiny_model(name))
        kwargs = {"padding_side": "left", **self.tokenizer_kwargs}
        return AutoTokenizer.from_pretrained(name, **kwargs)

    # ----- weights -----------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path | None:
        """Directory holding the safetensors checkpoint (downloads hub checkpoints the normal HF way)."""
        if self.source.kind == "card":
            return None
        if self.source.local_dir is not None:
            return self.source.local_dir
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.source.location, allow_patterns=["*.safetensors", "*.json"]))

    def load_weights(self, model: nn.Module, device: "str | torch.device", slices: Mapping[str, SliceSpec] | None = None,
                     sources: Mapping[str, Any] | None = None) -> nn.Module:
        """Materialize every parameter/buffer of ``model`` on ``device``, in place; returns ``model``.

        Checkpoint tensors are streamed one at a time (only ``slices[fqn] = (dim, start, stop)``
        when given). With ``skip_loading_weights`` (or a shape card) weights are random, HF-like
        and deterministic per name. Each loaded tensor must match the shape the model now has.
        For a GraphModule, ``device=meta`` literals baked in at export are re-pointed to ``device``.
        ``sources[fqn](reader)`` makes a tensor instead (``WeightReader``: FP8 weights quantized
        at load, scales in another layout than the checkpoint's; ``models/quantized.py``).
        """
        device = torch.device(device)
        slices = dict(slices or {})
        record = self._record()
        checkpoint = None
        if not self.skip_loading_weights:
            checkpoint = self._open_checkpoint(record)
        loaded: dict[tuple, torch.Tensor] = {}
        sources = dict(sources or {})
        reader = WeightReader(self, device, checkpoint, record)
        with torch.no_grad():
            for t in model_tensors(model):
                spec = slices.get(t.fqn)
                ranges = normalize_slices(spec)
                cache_key = (id(t.tensor), tuple(ranges) if ranges else None)
                value = loaded.get(cache_key)
                if value is None and t.fqn in sources:
                    value = sources[t.fqn](reader)
                elif value is None:
                    value = self._materialize(t, spec, device, checkpoint, record)
                    if list(value.shape) != list(t.tensor.shape):
                        raise CheckpointError(
                            f"{t.fqn}: loaded shape {list(value.shape)}"
                            f"{f' (slice {ranges})' if ranges else ''} != model shape {list(t.tensor.shape)}"
                            + ("; a sharded tensor must already have its per-rank shape" if ranges else "")
                        )
                loaded[cache_key] = set_tensor(model, t.fqn, value, t.is_param)
        if checkpoint is not None:
            checkpoint.close()
        if isinstance(model, fx.GraphModule):
            replace_device_literals(model, device)
        return model

    def _open_checkpoint(self, record: "_BuildRecord") -> "SafetensorsCheckpoint | Any":
        """The checkpoint reader for this model: a GGUF file, or the safetensors of a directory."""
        if self.source.kind == "gguf":
            cfg = self.config
            return open_gguf(self.source.location).checkpoint(
                cfg.num_hidden_layers, cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)
                or cfg.num_attention_heads)
        ckpt_dir = self.checkpoint_dir()
        if ckpt_dir is None:
            raise CheckpointError(f"model {self.model!r} is a shape card without weights; set skip_loading_weights=true")
        return SafetensorsCheckpoint(ckpt_dir, record.conversions, record.base_model_prefix)

    def _materialize(self, t, spec: SliceSpec, device: torch.device, checkpoint: "SafetensorsCheckpoint | Any",
                     record: "_BuildRecord") -> torch.Tensor:
        dtype = t.tensor.dtype
        if not t.is_param and not t.persistent:
            if t.fqn in record.buffer_values:
                return slice_tensor(record.buffer_values[t.fqn], spec).to(device=device, dtype=dtype)
            if t.tensor.device.type != "meta":
                return slice_tensor(t.tensor, spec).to(device)
            raise CheckpointError(f"no value for non-persistent buffer {t.fqn} (not recorded when the model was built)")
        if not t.is_param and t.fqn not in record.shapes and t.tensor.device.type != "meta":
            return slice_tensor(t.tensor, spec).to(device)  # a constant the export created, with its value
        aliases = [t.fqn] + [a for a in record.aliases.get(t.fqn, ()) if a != t.fqn]
        if checkpoint is not None:
            for name in aliases:
                if name in checkpoint:
                    return checkpoint.read(name, spec, dtype=dtype, device=device)
            if not t.is_param and t.tensor.device.type != "meta":
                return slice_tensor(t.tensor, spec).to(device)
            if not t.is_param and t.fqn not in record.shapes:
                raise CheckpointError(
                    f"buffer {t.fqn!r} is not in checkpoint {checkpoint.directory} and is not a buffer of the HF "
                    "model: a tensor constant created during export on meta has no value to load"
                )
            tied = f" (nor its tied alias(es) {', '.join(aliases[1:])})" if len(aliases) > 1 else ""
            raise CheckpointError(f"key {t.fqn!r}{tied} not found in checkpoint {checkpoint.directory}")
        canonical = min(aliases)  # tied names draw the same values
        full_shape = record.shapes.get(canonical, list(t.tensor.shape) if spec is None else None)
        if full_shape is None:
            raise CheckpointError(f"{t.fqn}: unknown full shape for a sliced random init")
        return random_tensor(canonical, full_shape, dtype, device, record.init_std, spec)


@dataclass
class WeightReader:
    """What a ``load_weights`` source reads from: ``read`` any tensor of the HF model by name, as
    the loader would (checkpoint or random init, a slice of it), and ``checkpoint`` itself (None
    for random weights)."""

    factory: ModelFactory
    device: torch.device
    checkpoint: SafetensorsCheckpoint | None
    record: "_BuildRecord"

    def read(self, fqn: str, spec: SliceSpec = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        stub = torch.empty(self.record.shapes.get(fqn, [0]), dtype=dtype or self.factory.dtype, device="meta")
        return self.factory._materialize(ModelTensor(fqn, stub, True), spec, self.device, self.checkpoint, self.record)


@dataclass
class _BuildRecord:
    """What load_weights needs to remember about the HF model once it has been exported."""

    shapes: dict[str, list[int]]
    aliases: dict[str, list[str]]  # fqn -> every name of the same (tied) tensor
    buffer_values: dict[str, torch.Tensor]
    conversions: list[Any]
    base_model_prefix: str
    init_std: float

    @classmethod
    def of(cls, model: nn.Module) -> "_BuildRecord":
        tensors = model_tensors(model)
        groups: dict[int, list[str]] = {}
        for t in tensors:
            groups.setdefault(id(t.tensor), []).append(t.fqn)
        aliases = {name: names for names in groups.values() if len(names) > 1 for name in names}
        config = getattr(model, "config", None)
        std = getattr(config, "initializer_range", None) or 0.02
        return cls(
            shapes={t.fqn: list(t.tensor.shape) for t in tensors},
            aliases=aliases,
            buffer_values=nonpersistent_buffer_values(model),
            conversions=_conversion_mapping(model),
            base_model_prefix=getattr(model, "base_model_prefix", "") or "",
            init_std=float(std),
        )


def _conversion_mapping(model: nn.Module) -> list[Any]:
    """transformers' checkpoint-key conversions for this model (renamed prefixes, fused experts)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # older transformers: checkpoints hold the model's own keys
        return []
    try:
        return list(get_model_conversion_mapping(model))
    except Exception as e:  # noqa: BLE001 - a missing mapping only matters if a key is missing later
        log.warning("could not get transformers' checkpoint conversion mapping for %s: %s", type(model).__name__, e)
        return []


FACTORIES: dict[str, type[ModelFactory]] = {"AutoModelForCausalLM": ModelFactory}


def register_factory(name: str):
    def deco(cls: type[ModelFactory]) -> type[ModelFactory]:
        FACTORIES[name] = cls
        return cls

    return deco


def get_factory_class(name: str) -> type[ModelFactory]:
    if name not in FACTORIES:
        close = difflib.get_close_matches(name, FACTORIES, n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown args.model_factory {name!r}{hint} (known: {', '.join(sorted(FACTORIES))})")
    return FACTORIES[name]


def create_factory(args: AutoDeployArgs, model: str | None = None) -> ModelFactory:
    """The factory named by ``args.model_factory`` (default AutoModelForCausalLM), built from ``args``."""
    return get_factory_class(args.model_factory).from_args(args, model=model)
