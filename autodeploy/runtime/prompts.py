"""Prompt forms the API accepts, and turning one into token ids.

A prompt is a string, a list of token ids, chat messages (``[{"role": ..., "content": ...}]``,
chat template applied), or a dict ``{"prompt": str}`` / ``{"prompt_token_ids": [...]}`` /
``{"messages": [...]}``. ``generate`` takes one prompt or a list of them.
"""

from __future__ import annotations

from typing import Any, Optional


def as_prompt_list(prompts: Any) -> list[Any]:
    """One prompt or a list of prompts -> a list of prompts."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]  # a single prompt of token ids
    if prompts and all(_is_message(p) for p in prompts):
        return [prompts]  # a single chat
    return prompts


def tokenize(prompt: Any, tokenizer: Optional[Any], vocab_size: Optional[int] = None) -> list[int]:
    """Token ids of one prompt; raises ValueError with a message for the user."""
    if isinstance(prompt, dict):
        keys = [k for k in ("prompt", "prompt_token_ids", "messages") if k in prompt]
        if len(keys) != 1:
            raise ValueError(f"a dict prompt needs exactly one of 'prompt', 'prompt_token_ids', 'messages'; got keys {sorted(prompt)}")
        prompt = prompt[keys[0]]
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("empty prompt")
        ids = list(_require(tokenizer, "text prompts").encode(prompt))
    elif isinstance(prompt, (list, tuple)) and prompt and all(_is_message(m) for m in prompt):
        ids = _apply_chat_template(list(prompt), _require(tokenizer, "chat prompts"))
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("empty prompt")
        # the element types first (C-speed: this runs on every token of every prompt, in TTFT)
        if not all(issubclass(tp, int) and tp is not bool for tp in set(map(type, prompt))):
            raise ValueError("a prompt list must hold token ids (ints) or chat messages ({'role', 'content'} dicts)")
        ids = list(prompt)
    else:
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}: use a string, token ids or chat messages")
    if not ids:
        raise ValueError("empty prompt (it tokenizes to no tokens)")
    if vocab_size is not None and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    return ids


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and "role" in m and "content" in m


def _require(tokenizer: Optional[Any], what: str) -> Any:
    if tokenizer is None:
        raise ValueError(f"{what} need a tokenizer; this engine has none (pass token ids)")
    return tokenizer


def _apply_chat_template(messages: list[dict], tokenizer: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass a plain string or token ids")
    # render to text first: the tokenized return type differs between transformers versions
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))
