"""Perplexity over strided windows, HF's sliding-window method, through ``prompt_logprobs``.

The text's tokens are cut into windows of ``window`` tokens starting every ``stride`` tokens (the
last one ends at the text's end). Each token is scored once, in the first window that reaches it,
with all the context that window gives it: a window scores the tokens after the previous window's
end (the first window all but its first token, which has no context). This is the method of HF's
"Perplexity of fixed-length models" guide (its ``labels`` with ``-100`` over the overlap), so the
number is comparable with HF's: ``hf_perplexity`` computes it on the same windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..config.errors import UserError


@dataclass(frozen=True)
class Window:
    begin: int  # the window is tokens [begin, end)
    end: int
    first_scored: int  # tokens [first_scored, end) are scored here


def strided_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    if window < 2 or not 1 <= stride <= window:
        raise UserError(f"perplexity needs window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    if num_tokens < 2:
        raise UserError(f"the text has {num_tokens} token(s); perplexity needs at least 2")
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        out.append(Window(begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end == num_tokens:
            break
    return out


@dataclass
class Perplexity:
    nll: float  # summed negative log-likelihood (nats)
    num_scored: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.num_scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def perplexity(llm: Any, ids: list[int], window: int, stride: int) -> Perplexity:
    """Ours: each window is one request with ``prompt_logprobs=0``, all windows in one ``generate``."""
    from ..runtime.sampling_params import SamplingParams

    windows = strided_windows(len(ids), window, stride)
    max_seq_len = int(llm.args.max_seq_len)
    if max(w.end - w.begin for w in windows) > max_seq_len:
        raise UserError(f"window={window} is longer than args.max_seq_len={max_seq_len}: "
                        f"pass a smaller --window or args.max_seq_len={window}")
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outputs = llm.generate([ids[w.begin: w.end] for w in windows], params, use_tqdm=False)
    nll, scored = 0.0, 0
    for w, out in zip(windows, outputs):
        if out.error:
            raise RuntimeError(f"window [{w.begin}, {w.end}) failed: {out.error}")
        for j in range(w.first_scored, w.end):
            nll -= out.prompt_logprobs[j - w.begin][ids[j]].logprob
            scored += 1
    return Perplexity(nll, scored)


def hf_perplexity(model: Any, ids: list[int], window: int, stride: int) -> Perplexity:
    """HF transformers on the same windows (``reference.hf_model``), summed in float64."""
    from .reference import hf_logprobs

    nll, scored = 0.0, 0
    for w in strided_windows(len(ids), window, stride):
        logprobs = hf_logprobs(model, ids[w.begin: w.end]).double()
        for j in range(w.first_scored, w.end):
            nll -= float(logprobs[j - 1 - w.begin, ids[j]])
            scored += 1
    return Perplexity(nll, scored)


def read_text_ids(llm: Any, path: str) -> list[int]:
    """The file's text tokenized as a prompt is (special tokens such as BOS included)."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--text {path}: no such file")
    if llm.tokenizer is None:
        raise UserError(f"model {llm.config.model} has no tokenizer: perplexity needs one")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"--text {path} is empty")
    return list(llm.tokenizer.encode(text))


def report(ours: Perplexity, hf: Optional[Perplexity], header: str) -> str:
    rows = [f"{header}", "", "| | perplexity | NLL per token | tokens scored |", "|---|---:|---:|---:|",
            f"| autodeploy | {ours.perplexity:.4f} | {ours.mean_nll:.6f} | {ours.num_scored} |"]
    if hf is not None:
        rows.append(f"| HF transformers | {hf.perplexity:.4f} | {hf.mean_nll:.6f} | {hf.num_scored} |")
        rows.append(f"| relative difference | {relative_difference(ours, hf):.4%} | | |")
    return "\n".join(rows)


def relative_difference(ours: Perplexity, hf: Perplexity) -> float:
    return abs(ours.perplexity - hf.perplexity) / hf.perplexity
