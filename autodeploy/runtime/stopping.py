"""When a request is done, and its output text.

Checked after every generated token, in this order: stop token (EOS unless ``ignore_eos``, or one
of ``stop_token_ids``) -> ``"stop"``; a stop string in the text -> ``"stop"`` (text cut before it);
``max_tokens`` generated, or no room left in ``max_seq_len`` -> ``"length"``.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from .request import Request


class StopChecker:
    def __init__(self, eos_token_ids: Iterable[int], max_seq_len: int, tokenizer: Optional[Any]):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer

    def __call__(self, request: Request) -> None:
        """Set ``finish_reason`` (and ``stop_reason``) if the request's last token ends it."""
        params, token = request.params, request.token_ids[-1]
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            request.finish_reason, request.stop_reason = "stop", token
        elif params.stop and self._cut_at_stop_string(request):
            request.finish_reason = "stop"
        # every token fed to the model has a position < max_seq_len
        elif request.num_generated >= params.max_tokens or request.num_tokens > self.max_seq_len:
            request.finish_reason = "length"
        if request.finish_reason and request.text is None:
            request.text = self.detokenize(request)

    def detokenize(self, request: Request) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(request.output_token_ids, skip_special_tokens=request.params.skip_special_tokens)

    def _cut_at_stop_string(self, request: Request) -> bool:
        text = self.detokenize(request)
        hits = [(text.find(s), s) for s in request.params.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        request.stop_reason = stop
        request.text = text[: index + len(stop)] if request.params.include_stop_str_in_output else text[:index]
        return True
