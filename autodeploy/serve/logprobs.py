"""The engine's logprobs in OpenAI's two shapes.

The engine gives one ``{token_id: Logprob(logprob, rank, decoded_token)}`` per generated token: the
sampled token and the ``k`` most likely ones (``RequestOutput.logprobs``). Completions answer with
the legacy shape ``{tokens, token_logprobs, top_logprobs, text_offset}`` (top_logprobs: the sampled
token and the top k, as vLLM); chat with ``{content: [{token, logprob, bytes, top_logprobs}]}``
(top_logprobs: the k most likely, by rank). -inf becomes -9999.0, as JSON has no infinity.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

Decode = Callable[[int], str]


def _value(logprob: float) -> float:
    return max(logprob, -9999.0) if not math.isnan(logprob) else -9999.0


def _token(token_id: int, entry: Any, decode: Decode) -> str:
    text = getattr(entry, "decoded_token", None)
    return text if text is not None else decode(token_id)


def _ranked(step: dict, k: int) -> list[tuple[int, Any]]:
    """The top ``k`` entries of one step by rank (an entry without a rank sorts by its logprob)."""
    entries = sorted(step.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else math.inf,
                                                    -kv[1].logprob))
    return [(tid, e) for tid, e in entries if e.rank is not None and e.rank <= k][:k]


def completion_logprobs(token_ids: list[int], steps: list[Optional[dict]], k: int, decode: Decode,
                        text_offset: int = 0) -> tuple[dict, int]:
    """The legacy ``logprobs`` object of ``token_ids`` (one engine step each), and the text offset
    after them (a stream continues from it)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, step in zip(token_ids, steps):
        step = step or {}
        sampled = step.get(tid)
        token = _token(tid, sampled, decode)
        top = {token: _value(sampled.logprob)} if sampled is not None else {}
        for i, e in _ranked(step, k):  # two ids may decode alike (a split character): the sampled one keeps its key
            top.setdefault(_token(i, e, decode), _value(e.logprob))
        out["tokens"].append(token)
        out["token_logprobs"].append(_value(sampled.logprob) if sampled is not None else None)
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out, text_offset


def chat_logprobs(token_ids: list[int], steps: list[Optional[dict]], k: int, decode: Decode) -> dict:
    """The chat ``logprobs`` object of ``token_ids``: ``{"content": [...]}``."""
    content = []
    for tid, step in zip(token_ids, steps):
        step = step or {}
        sampled = step.get(tid)
        token = _token(tid, sampled, decode)
        content.append({
            "token": token,
            "logprob": _value(sampled.logprob) if sampled is not None else -9999.0,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := _token(i, e, decode)), "logprob": _value(e.logprob), "bytes": list(t.encode("utf-8"))}
                for i, e in _ranked(step, k)
            ],
        })
    return {"content": content}
