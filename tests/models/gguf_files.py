"""Writing small GGUF files for tests with the ``gguf`` package's writer and quantizers, the way
llama.cpp's converter lays them out: its tensor names, a llama's q/k rows interleaved per head,
the tokenizer and chat template as metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rotate-half rows, interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantized(values: np.ndarray, qtype) -> np.ndarray:
    """``values`` in ``qtype`` with gguf's quantizer (raw bytes for block types)."""
    from gguf.quants import quantize

    return quantize(values.astype(np.float32), qtype)


def write_gguf(path: Path, model: Any, tokenizer: Any = None, qtype: str = "F32", arch: str | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (an HF causal LM with real weights) as a GGUF file: matrices in ``qtype``
    (F32 where a row does not fill whole blocks), vectors in F32. Returns ``path``."""
    import gguf

    cfg = model.config
    arch = arch or cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer)
    for key, value in (extra or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_uint32(key, value)

    gqtype = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[gqtype][0]
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        values = tensor.detach().float().numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            values = llama_cpp_permute(values, cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads)
        if values.ndim == 2 and values.shape[-1] % block == 0 and qtype != "F32":
            writer.add_tensor(name, quantized(values, gqtype), raw_dtype=gqtype)
        else:
            writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: Any, tokenizer: Any) -> None:
    """A byte-level BPE tokenizer (``tokenizer.json`` model BPE) as GGUF ``gpt2`` metadata."""
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(tokenizer)
    for token, index in vocab.items():
        tokens[index] = token
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
    special = {a["id"] for a in spec["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3 = control
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    probe = tokenizer.encode("a")
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_raw_tensor(path: Path, name: str, data: np.ndarray, qtype: str, shape: tuple[int, ...],
                     arch: str = "llama", heads: tuple[int, int] = (4, 2)) -> Path:
    """A GGUF holding one tensor ``name``: ``data`` in ``qtype`` (for block types the bytes, shaped
    ``quant_byte_shape(shape)``), with just enough metadata to open it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(shape[-1])
    writer.add_feed_forward_length(shape[0])
    writer.add_head_count(heads[0])
    writer.add_head_count_kv(heads[1])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(32)
    writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])  # uint8 data: blocks of bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quant_byte_shape(shape: tuple[int, ...], qtype) -> tuple[int, ...]:
    from gguf.quants import quant_shape_to_byte_shape

    return quant_shape_to_byte_shape(shape, qtype)


def torch_model(config: Any, seed: int = 0):
    """An HF causal LM with random weights (HF init, ``seed``), in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
