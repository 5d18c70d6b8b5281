"""GGUF checkpoints: the config, tokenizer and weights of one ``.gguf`` file (llama.cpp's format).

``--model path/to/file.gguf`` (or a directory holding exactly one ``.gguf``) needs no ``config.json``:

- the config is rebuilt from the file's metadata (``<arch>.block_count``, ``<arch>.embedding_length``, ...);
- the tokenizer and its chat template come from the ``tokenizer.*`` metadata, converted by
  transformers' own GGUF tokenizer conversion (``gguf_file=``);
- the weights are read with the ``gguf`` package's ``GGUFReader`` (a memory map) and dequantized
  with its ``gguf.quants.dequantize``, one tensor (or one rank's slice) at a time, into the run's
  dtype. A slice reads only the rows it needs and, along a quantized row, only the blocks that
  cover it.

Tensor names map to the HF model's through ``gguf``'s own name table (``get_tensor_name_map``).
llama.cpp stores a llama's q/k projections with each head's rotary halves interleaved; they are
put back in HF's order per head, so a rank reading whole heads reads only its rows.

What cannot be served right (an architecture outside ``ARCHITECTURES``, a tensor type ``gguf``
cannot dequantize, llama3-style ``rope_freqs``) is a ``UserError`` when the file is opened,
before any model work.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.errors import UserError
from .checkpoint import SliceSpec, normalize_slices, read_ranges

log = logging.getLogger(__name__)

# GGUF architecture -> (HF model_type, HF class, whether q/k rows are rotary-interleaved per head)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}

# <arch>.<key> -> HF config field, for every architecture above
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
}


class GGUFError(UserError):
    """A GGUF file that cannot be served: unsupported architecture or tensor type, or a bad file."""


def find_gguf(path: "str | os.PathLike") -> Path | None:
    """The GGUF file ``path`` names (the file, or the only ``.gguf`` in a directory), else None."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf")
    if len(files) > 1:
        raise GGUFError(f"{path} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}): pass one of them")
    return files[0] if files else None


def open_gguf(path: "str | os.PathLike") -> "GGUFFile":
    """The parsed file, shared by everything in this process that opens the same, unchanged file."""
    path = Path(path).resolve()
    stat = path.stat()
    return _open(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open(path: str, size: int, mtime_ns: int) -> "GGUFFile":
    return GGUFFile(path)


def _reader(path: str):
    import gguf

    class Reader(gguf.GGUFReader):
        """``GGUFReader`` reads every metadata value with ``_get`` (~250k calls for a 49k vocabulary
        and its merges): a plain ndarray view of the same file mapping skips np.memmap's per-slice
        bookkeeping, and ``_get`` (same values) skips its per-call dtype allocation and no-op
        byte-order view. 9 s -> 2 s for SmolLM2's file on a busy 2-core machine."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

        def _get(self, offset, dtype, count=1, override_order=None):
            dtype, count = _DTYPES.get(dtype) or np.dtype(dtype), int(count)
            arr = self.data[offset: offset + dtype.itemsize * count].view(dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    try:
        return Reader(path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"cannot read GGUF file {path}: {e}") from None


_DTYPES = {t: np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
                                    np.float32, np.float64, np.bool_)}


def _dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """``gguf.quants.dequantize``, its rows split over the intra-op threads (numpy lets go of the GIL)."""
    from gguf.quants import dequantize

    workers = torch.get_num_threads()
    if workers < 2 or raw.ndim < 2 or raw.shape[0] < 128:
        return dequantize(raw, qtype)
    parts = _pool(workers).map(lambda part: dequantize(part, qtype), np.array_split(raw, workers))
    return np.concatenate(list(parts))


@functools.lru_cache(maxsize=None)
def _pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(workers, thread_name_prefix="gguf-dequantize")


@functools.lru_cache(maxsize=None)
def dequantizable(qtype: int) -> bool:
    """Whether ``gguf.quants.dequantize`` handles this tensor type (probed on one block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(qtype)
    try:
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class GGUFFile:
    """One GGUF file: its metadata, HF config, tokenizer and tensors (nothing dequantized yet)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.reader = _reader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = str(self.field("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(
                f"GGUF architecture {self.architecture!r} of {self.path.name} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self.model_type, self.model_class, self.rotary_interleaved = ARCHITECTURES[self.architecture]
        bad = {t.tensor_type.name: t.name for t in self.reader.tensors if not dequantizable(int(t.tensor_type))}
        if bad:
            kinds = ", ".join(f"{k} ({v}, ...)" for k, v in bad.items())
            raise GGUFError(f"{self.path.name} holds tensor types the gguf package cannot dequantize: {kinds}")
        if "rope_freqs.weight" in self.tensors or self.field(f"{self.architecture}.rope.scaling.type", "none") != "none":
            raise GGUFError(f"{self.path.name} uses RoPE scaling (rope_freqs / rope.scaling), which GGUF loading does not support")

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (str, int, float, bool or list), or ``default``."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    # ----- config --------------------------------------------------------------------------------
    def config(self):
        """The HF config this file's metadata describes."""
        from transformers import AutoConfig

        arch = self.architecture
        fields: dict[str, Any] = {}
        for key, name in _CONFIG_KEYS.items():
            value = self.field(f"{arch}.{key}")
            if value is not None:
                fields[name] = value
        if isinstance(fields.get("num_key_value_heads"), list):
            raise GGUFError(f"{self.path.name} has per-layer KV head counts, which GGUF loading does not support")
        if "head_dim" not in fields and arch == "llama" and self.field("llama.rope.dimension_count") is not None:
            fields["head_dim"] = self.field("llama.rope.dimension_count")  # llama.cpp rotates the whole head
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(self.field(f"{arch}.rope.freq_base", 10000.0))}
        vocab = self.field(f"{arch}.vocab_size")
        if vocab is None and "tokenizer.ggml.tokens" in self.reader.fields:
            vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        if vocab is None:
            vocab = self._shape("token_embd.weight")[0]
        fields["vocab_size"] = int(vocab)
        for token in ("bos", "eos"):
            fields[f"{token}_token_id"] = self.field(f"tokenizer.ggml.{token}_token_id")
        fields["pad_token_id"] = self.field("tokenizer.ggml.padding_token_id")
        # llama.cpp writes the output projection only when it is not the embedding matrix
        fields["tie_word_embeddings"] = "output.weight" not in self.tensors
        if arch == "llama":
            fields["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
        fields["architectures"] = [self.model_class]
        fields["dtype"] = self.dtype()
        return AutoConfig.for_model(self.model_type, **fields)

    def dtype(self) -> str:
        """The float type the file's weights were written in: float32 once anything is quantized."""
        names = {t.tensor_type.name for t in self.reader.tensors} - {"F32"}
        return {frozenset({"F16"}): "float16", frozenset({"BF16"}): "bfloat16"}.get(frozenset(names), "float32")

    # ----- tokenizer -----------------------------------------------------------------------------
    def tokenizer(self, **kwargs):
        """The tokenizer (with its chat template), converted by transformers from the metadata."""
        from transformers import PreTrainedTokenizerFast

        if "tokenizer.ggml.tokens" not in self.reader.fields:
            return None
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(self.path.parent), gguf_file=self.path.name, **kwargs)
        except ValueError as e:  # a tokenizer model transformers cannot rebuild
            raise GGUFError(f"cannot build the tokenizer of {self.path.name}: {e}") from None

    # ----- tensors -------------------------------------------------------------------------------
    def _shape(self, name: str) -> list[int]:
        return [int(d) for d in reversed(self.tensors[name].shape.tolist())]  # GGUF lists dims innermost first

    def checkpoint(self, num_layers: int, num_heads: int, num_kv_heads: int) -> "GGUFCheckpoint":
        return GGUFCheckpoint(self, num_layers, num_heads, num_kv_heads)


class GGUFCheckpoint:
    """Read model tensors (or one rank's slices) from a GGUF file by their HF names, dequantized.

    The interface of ``SafetensorsCheckpoint``: ``key in ckpt``, ``shape(key)``, ``read(key, spec,
    dtype, device)``, ``close()``.
    """

    def __init__(self, file: GGUFFile, num_layers: int, num_heads: int, num_kv_heads: int):
        import gguf

        self.file = file
        self.directory = file.path  # named in the factory's error messages
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == file.architecture)
        self._names = gguf.get_tensor_name_map(arch, num_layers)
        self._heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    def gguf_name(self, model_key: str) -> str | None:
        name = self._names.get_name(model_key, try_suffixes=(".weight", ".bias"))
        return name if name in self.file.tensors else None

    def __contains__(self, model_key: str) -> bool:
        return self.gguf_name(model_key) is not None

    def shape(self, model_key: str) -> list[int]:
        return self.file._shape(self._require(model_key))

    def _require(self, model_key: str) -> str:
        name = self.gguf_name(model_key)
        if name is None:
            from .checkpoint import CheckpointError

            raise CheckpointError(f"key {model_key!r} not found in GGUF file {self.file.path}")
        return name

    def read(self, model_key: str, spec: SliceSpec = None, dtype: torch.dtype | None = None,
             device: "torch.device | str" = "cpu") -> torch.Tensor:
        """``model_key`` (only the ranges in ``spec``), dequantized, on ``device`` in ``dtype``."""
        name = self._require(model_key)
        shape = self.file._shape(name)
        ranges = normalize_slices(spec) or [(0, 0, shape[0])]
        tensor = read_ranges(ranges, len(shape), lambda box: self._read_box(name, shape, box))
        return tensor.to(device=device, dtype=dtype or torch.float32)

    def _read_box(self, name: str, shape: list[int], box: dict[int, tuple[int, int]]) -> torch.Tensor:
        """The part ``box`` (dim -> [start, stop)) of tensor ``name``: only the rows it covers and,
        along a quantized row, only the blocks that cover it, dequantized."""
        from gguf import GGML_QUANT_SIZES

        info = self.file.tensors[name]
        qtype = info.tensor_type
        spans = [box.get(d, (0, shape[d])) for d in range(len(shape))]
        heads = self._heads.get(name.split(".")[-2]) if self.file.rotary_interleaved else None
        read, keep = list(spans), [slice(None)] * len(shape)
        if heads:  # whole heads: the interleave is undone per head
            head_dim = shape[0] // heads
            lo, hi = spans[0]
            read[0] = (lo // head_dim * head_dim, -(-hi // head_dim) * head_dim)
            keep[0] = slice(lo - read[0][0], hi - read[0][0])
        index = [slice(a, b) for a, b in read]
        if info.data.dtype == np.uint8:  # blocks of bytes along the last dim
            block, type_size = GGML_QUANT_SIZES[qtype]
            lo, hi = read[-1]
            first, last = lo // block, -(-hi // block)
            index[-1] = slice(first * type_size, last * type_size)
            keep[-1] = slice(lo - first * block, hi - first * block)
        values = _dequantize(info.data[tuple(index)], qtype)
        if not values.flags.writeable:  # F32 comes back as a view of the read-only file mapping
            values = values.copy()
        out = torch.from_numpy(values)
        if heads:
            rows = out.shape[0]
            out = out.reshape(rows // head_dim, head_dim // 2, 2, *out.shape[1:]).transpose(1, 2).reshape(out.shape)
        return out[tuple(keep)].contiguous()

    def close(self) -> None:
        pass  # the file mapping stays open in the process-wide cache (open_gguf)
