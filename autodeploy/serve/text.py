"""A stream's text, released in pieces that never change afterwards.

Decoding a growing token list one token at a time gives text that may still change: a multi-byte
character spans tokens (``\\ufffd`` until it is whole), and a stop string may be starting (the
engine cuts it from the final text). So the new text is decoded from a short window of recent
tokens (the windowed scheme vLLM uses: the tokens before the window give the first one its
leading-space context), and what could still change is held back: a trailing ``\\ufffd`` and,
with stop strings, as many characters as the longest stop string minus one. When the request ends,
``finish`` releases the rest of the engine's final text, so the streamed pieces add up to the
non-streamed text.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("autodeploy.serve")

WINDOW = 5  # tokens of context before the new ones


class TextStream:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # the Rust tokenizer's own decode (a third of the time) where transformers adds nothing to it
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode = backend.decode if plain else tokenizer.decode if tokenizer is not None else None
        self.holdback = max((len(s) for s in stop or []), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded so far (may end in characters still held back)
        self.sent = 0  # characters of `text` released
        self._prefix = 0  # window start: tokens before it are in `text` for good
        self._read = 0  # tokens decoded into `text`

    def add(self, new_ids: list[int]) -> str:
        """The text that ``new_ids`` release (may be empty)."""
        if self.tokenizer is None or not new_ids:
            return ""
        self.ids.extend(new_ids)
        decode, skip = self._decode, self.skip_special_tokens
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=skip)
        now = decode(self.ids[self._prefix:], skip_special_tokens=skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._read = len(self.ids)
            self._prefix = max(self._prefix, self._read - WINDOW)
        ready = len(self.text) - self.holdback
        if ready <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:ready], ready
        return piece

    def finish(self, final_text: str) -> str:
        """The rest of the request's final text (the engine's: stop strings cut)."""
        released = self.text[:self.sent]
        if not final_text.startswith(released):  # sent text cannot be taken back
            log.warning("streamed text diverged from the final text within its first %d characters", self.sent)
        self.sent = len(final_text)
        return final_text[len(released):]
