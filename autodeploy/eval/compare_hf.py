"""Greedy tokens and logits against HF transformers on the same weights (``reference.hf_model``).

Per prompt: our greedy tokens against HF ``generate``'s, and our log-probabilities against HF's
``log_softmax`` on the same sequence (prompt + our output): every prompt token, every generated
token and each position's top-k alternatives. A log-probability is the logit minus the position's
log-sum-exp, so this compares the logits (up to that constant per row) where they matter.

A prompt fails when a log-probability differs by more than ``atol``, or when the tokens differ at
a position where HF's top two are further apart than ``atol`` (closer, either pick is right within
the numerics: reported as a near tie).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

TOP_K = 5
# default tolerances on a log-probability: fp32 sums differ in order only; 16-bit rounds every layer
ATOL = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}


@dataclass
class PromptComparison:
    prompt_tokens: int
    ours: list[int]
    hf: list[int]
    max_diff_prompt: float  # max |ours - HF| over the prompt positions' logprobs (top-k included)
    max_diff_output: float  # the same over the generated positions
    first_mismatch: Optional[int]  # index of the first generated token that differs
    near_tie: bool  # HF's top two there are within atol

    def ok(self, atol: float) -> bool:
        tokens_ok = self.first_mismatch is None or self.near_tie
        return tokens_ok and max(self.max_diff_prompt, self.max_diff_output) <= atol


def compare_prompt(llm: Any, model: Any, out: Any, max_tokens: int, atol: float) -> PromptComparison:
    from .reference import hf_greedy, hf_logprobs

    prompt = list(out.prompt_token_ids)
    ref = hf_logprobs(model, prompt + out.token_ids)
    n = len(prompt)

    def max_diff(entries, start):
        worst = 0.0
        for i, entry in enumerate(entries):
            row = ref[start + i]
            worst = max(worst, max(abs(lp.logprob - float(row[t])) for t, lp in entry.items()))
        return worst

    hf_tokens = hf_greedy(model, prompt, max_tokens)
    mismatch = next((i for i, (a, b) in enumerate(zip(out.token_ids, hf_tokens)) if a != b), None)
    near_tie = False
    if mismatch is not None:  # the sequences agree up to here, so ref's row is HF's distribution there
        row = ref[n - 1 + mismatch]
        near_tie = abs(float(row[out.token_ids[mismatch]]) - float(row[hf_tokens[mismatch]])) <= atol
    return PromptComparison(n, list(out.token_ids), hf_tokens, max_diff(out.prompt_logprobs[1:], 0),
                            max_diff(out.logprobs, n - 1), mismatch, near_tie)


def compare(llm: Any, prompts: list[Any], max_tokens: int, atol: float) -> list[PromptComparison]:
    from ..runtime.sampling_params import SamplingParams
    from .reference import hf_model

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP_K,
                            prompt_logprobs=TOP_K)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    failed = [o for o in outputs if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} prompt(s) failed: {failed[0].error}")
    model = hf_model(llm)
    return [compare_prompt(llm, model, out, max_tokens, atol) for out in outputs]


def report(results: list[PromptComparison], atol: float, header: str) -> str:
    rows = [header, "", "| # | prompt tokens | greedy tokens equal | max abs diff logprob, prompt | "
            "max abs diff logprob, output | status |", "|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(results):
        equal = len(r.ours) if r.first_mismatch is None else r.first_mismatch
        status = "ok" if r.ok(atol) else "MISMATCH"
        if r.first_mismatch is not None:
            status += f" (token {r.first_mismatch}: {r.ours[r.first_mismatch]} vs HF {r.hf[r.first_mismatch]}" \
                      f"{', a near tie' if r.near_tie else ''})"
        rows.append(f"| {i} | {r.prompt_tokens} | {equal}/{len(r.ours)} | {r.max_diff_prompt:.2e} | "
                    f"{r.max_diff_output:.2e} | {status} |")
    total = sum(len(r.ours) if r.first_mismatch is None else r.first_mismatch for r in results)
    rows.append("")
    rows.append(f"{total} of {sum(len(r.ours) for r in results)} greedy tokens equal HF's before the first "
                f"difference; tolerance {atol:g} on a log-probability")
    return "\n".join(rows)
