"""HF transformers on the same weights as a built ``LLM``: the reference of the accuracy checks.

The model comes from the run's own factory (``build_model`` + ``load_weights``: the checkpoint the
engine loaded, in its dtype, on its device), so a difference is ours, not the weights'.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_arg(model: torch.nn.Module) -> str:
    """The name of HF's KV-cache argument (and output field): ``cache`` from transformers 5.2x on,
    where ``past_key_values`` is deprecated (gone from ``forward`` in 5.40); ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_model(llm: Any) -> torch.nn.Module:
    """The HF model of ``llm``'s checkpoint on ``llm``'s device, eval mode, with a KV cache for generate."""
    factory = llm.factory
    device = llm.engine.cache.device
    model = factory.build_model("meta")
    factory.load_weights(model, device)
    model.eval()
    # the factory builds for export, without a cache: generate would recompute every prefix
    model.config.use_cache = model.generation_config.use_cache = True
    return model


@torch.inference_mode()
def hf_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """``[len(ids), V]`` fp32: row i is ``log_softmax`` of the logits after ``ids[: i + 1]``."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device), use_cache=False).logits[0]
    return logits.float().log_softmax(dim=-1).cpu()


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, ids: list[int], max_new_tokens: int) -> list[int]:
    """The ``max_new_tokens`` tokens HF ``generate`` picks greedily (EOS ignored) after ``ids``."""
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                         temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()
