"""lm-evaluation-harness model class (the ``eval`` extra): lm-eval tasks against autodeploy.

    import lm_eval
    from autodeploy.eval.harness import AutoDeployLM
    lm = AutoDeployLM(model="path/or/card", max_seq_len=2048)   # LLM(...) keyword arguments
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

Importing this module registers it as lm-eval's ``"autodeploy"`` model, so
``simple_evaluate(model="autodeploy", model_args="model=...,max_seq_len=2048")`` works too.

- ``loglikelihood``: the continuation's summed log-probability through ``prompt_logprobs`` of
  context + continuation, and whether every continuation token is the greedy one (rank 1);
- ``loglikelihood_rolling``: lm-eval's rolling windows (each token scored once, with up to
  ``max_length`` tokens of context), summed;
- ``generate_until``: greedy (or sampled with ``do_sample``) generation cut at the ``until`` strings.
All of a call's requests go to the engine at once; it batches them. As in lm-eval's HF model, a
sequence longer than ``max_length + 1`` tokens keeps its last ones; ``max_length`` is
``args.max_seq_len - 1`` so that those ``max_length + 1`` tokens fit a request.
"""

from __future__ import annotations

from typing import Any, Optional

import lm_eval.models  # noqa: F401 - lm-eval's own models stay discoverable beside ours
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..runtime.sampling_params import SamplingParams


@register_model("autodeploy")
class AutoDeployLM(TemplateLM):
    def __init__(self, model: Optional[str] = None, llm: Any = None, max_gen_toks: int = 256, **llm_kwargs: Any):
        """``llm``: an ``LLM`` already built (then ``model`` and ``llm_kwargs`` must be absent);
        else ``LLM(model, **llm_kwargs)``. ``max_gen_toks``: ``generate_until``'s default length."""
        super().__init__()
        if llm is None:
            from ..llm import LLM

            llm = LLM(model, **llm_kwargs)
        elif model is not None or llm_kwargs:
            raise ValueError("pass either llm= or model= with LLM keyword arguments, not both")
        if llm.tokenizer is None:
            raise ValueError(f"model {llm.config.model} has no tokenizer: lm-eval tasks are text")
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_gen_toks = int(max_gen_toks)

    # ---- tokens ----

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # the first token's context in loglikelihood_rolling and empty contexts (lm-eval's HF model's choice)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return int(self.llm.args.max_seq_len) - 1

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", str(self.llm.config.model)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        # as lm-eval's HF model: the tokenizer's default (its BOS, if it adds one) unless told, and
        # no second BOS in front of a string that starts with one
        if add_special_tokens is None:
            bos = getattr(self.tokenizer, "bos_token", None)
            add_special_tokens = not (bos and string.startswith(bos))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---- scoring ----

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed logprob of ``continuation``, all of it greedy) for each (context, continuation)."""
        sequences, scored = [], []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("lm-eval asked for the loglikelihood of an empty continuation")
            whole = (context + continuation)[-(self.max_length + 1):]
            sequences.append(whole)
            scored.append(min(len(continuation), len(whole) - 1))  # the first token has no context
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        outputs = self.llm.generate(sequences, params, use_tqdm=False)
        results = []
        for whole, n, out in zip(sequences, scored, outputs):
            if out.error:
                raise RuntimeError(f"autodeploy request failed: {out.error}")
            entries = [out.prompt_logprobs[i][whole[i]] for i in range(len(whole) - n, len(whole))]
            results.append((sum(e.logprob for e in entries), all(e.rank == 1 for e in entries)))
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length,
                                                    context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ----

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for request in requests:
            context, gen_kwargs = request.args
            sp = self._sampling_params(dict(gen_kwargs or {}))
            # the context keeps its last tokens, leaving room for the generation
            prompts.append(self.tok_encode(context)[-max(self.max_length + 1 - sp.max_tokens, 1):])
            params.append(sp)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        texts = []
        for request, out in zip(requests, outputs):
            if out.error:
                raise RuntimeError(f"autodeploy request failed: {out.error}")
            texts.append(out.text)
            self.cache_hook.add_partial("generate_until", request.args, out.text)
        return texts

    def _sampling_params(self, kwargs: dict[str, Any]) -> SamplingParams:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        if not sample:
            temperature = 0.0
        top_p = kwargs.pop("top_p", None)
        top_k = kwargs.pop("top_k", None)
        seed = kwargs.pop("seed", None)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=until or None,
                              top_p=1.0 if top_p is None else float(top_p), top_k=None if top_k is None else int(top_k),
                              seed=None if seed is None else int(seed))
