"""The flattened batch of one forward: token inputs plus the metadata the cached ops read.

Layout (docs/architecture.md, "Runtime contract"): all sequences' new tokens back to back in
``input_ids``/``position_ids`` ``[1, T]``, prefills first, then decodes; per sequence ``seq_len``,
``input_pos``, ``cu_seqlen``, ``page_table`` (padded with 0) and ``slot_idx``.

``logits_idx [G]`` (int64) lists the rows of the flattened batch whose logits the step needs, in
order: each sequence's last token, or every token of a sequence that asks for them (prompt
logprobs, ``full_logits``); a graph that gathers its logits (``insert_cached_last_tokens``) computes
the LM head for those rows only, so ``G == B`` unless a request wants prompt logprobs.

Everything is packed on the host into one buffer and moved with a single copy (pinned and
non-blocking on CUDA); the device tensors are views of one persistent buffer, so their addresses
stay fixed between steps and a step launches no conversion kernel. The int32 buffer starts with a
header ``[1, B, T, G]`` (what the other ranks of a multi-rank run read first: the buffer is the one
message a step sends them, ``distributed/ranks.py``); the int64 inputs (``input_ids``,
``position_ids`` and ``logits_idx``) follow, viewed as int64, then the int32 metadata.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Optional, Sequence

import torch

# graph inputs added by insert_cached_attention, in placeholder order
METADATA_NAMES = ("seq_len", "input_pos", "cu_seqlen", "page_table", "slot_idx")
HEADER = 4  # int32 values before the inputs: [1, num_seqs, num_tokens, num_logits] (keeps the int64 views aligned)


def packed_size(num_seqs: int, num_tokens: int, num_logits: int, max_pages_per_seq: int) -> int:
    """int32 values ``build`` writes for a batch of this size: header, tokens, positions, logits rows
    (int64: 2 values each), metadata."""
    return HEADER + 2 * (2 * num_tokens + num_logits) + num_seqs * (4 + max_pages_per_seq) + 1


def message_size(max_batch_size: int, max_pages_per_seq: int) -> int:
    """The leading part of the buffer that another rank receives in one message each step: the
    header and the inputs of any decode step (one token per sequence)."""
    return packed_size(max_batch_size, max_batch_size, max_batch_size, max_pages_per_seq)


@dataclass
class BatchInputs:
    named_args: dict[str, torch.Tensor]  # input_ids, position_ids, METADATA_NAMES and logits_idx
    num_tokens: int
    num_seqs: int
    num_logits: int  # G: rows of logits_idx

    @property
    def logits_idx(self) -> torch.Tensor:
        """``[G]`` int64: the flattened-batch rows whose logits the step needs (module docstring)."""
        return self.named_args["logits_idx"]


class SequenceInfo:
    def __init__(self, max_batch_size: int, max_num_tokens: int, max_pages_per_seq: int, device="cpu"):
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max(max_num_tokens, max_batch_size)
        self.max_pages_per_seq = max_pages_per_seq
        self.device = torch.device(device)
        # int32 slots: the header, 2 per int64 value (up to 3 per token), then the int32 metadata
        size = self.packed_size(max_batch_size, self.max_num_tokens, self.max_num_tokens)
        self.message_size = message_size(max_batch_size, max_pages_per_seq)
        on_cuda = self.device.type == "cuda"
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=on_cuda)
        self._device = torch.zeros(size, dtype=torch.int32, device=self.device) if on_cuda else self._host
        # the host buffer is reused: wait for the previous copy out of it (long done in steady state)
        self._copied = torch.cuda.Event() if on_cuda else None
        self._views_by_shape: dict[tuple[int, int, int], BatchInputs] = {}  # decode steps repeat shapes

    def build(
        self,
        tokens: list[list[int]],
        input_pos: list[int],
        pages: list[list[int]],
        slots: list[int],
        full_logits: Optional[Sequence[bool]] = None,
    ) -> BatchInputs:
        """``tokens[i]``: the new tokens of sequence i; ``input_pos[i]``: how many it has cached;
        ``full_logits[i]``: True if every one of its tokens needs logits (else its last one only)."""
        num_seqs, max_pages = len(tokens), self.max_pages_per_seq
        seq_len = [len(t) for t in tokens]
        num_tokens = sum(seq_len)
        if not 0 < num_seqs <= self.max_batch_size or num_tokens > self.max_num_tokens:
            raise ValueError(
                f"batch of {num_seqs} sequences / {num_tokens} tokens exceeds "
                f"max_batch_size={self.max_batch_size} / max_num_tokens={self.max_num_tokens}"
            )
        cu_seqlen = list(accumulate(seq_len, initial=0))
        wide = array("q")  # int64: input_ids, position_ids, logits_idx
        for t in tokens:
            wide.extend(t)
        for p, n in zip(input_pos, seq_len):
            wide.extend(range(p, p + n))
        if full_logits is None or not any(full_logits):
            wide.extend(c - 1 for c in cu_seqlen[1:])
        else:
            for start, end, full in zip(cu_seqlen, cu_seqlen[1:], full_logits):
                wide.extend(range(start, end) if full else (end - 1,))
        num_logits = len(wide) - 2 * num_tokens
        packed = array("i", (1, num_seqs, num_tokens, num_logits))  # the header, then the int64 inputs
        packed.frombytes(wide.tobytes())
        packed.extend(seq_len)  # int32 metadata
        packed.extend(input_pos)
        packed.extend(cu_seqlen)
        for row in pages:
            packed.extend(row)
            packed.extend([0] * (max_pages - len(row)))
        packed.extend(slots)
        end = len(packed)
        if self._copied is not None:
            self._copied.synchronize()
        self._host[:end].copy_(torch.frombuffer(packed, dtype=torch.int32))
        if self._copied is not None:
            self._device[:end].copy_(self._host[:end], non_blocking=True)
            self._copied.record()
        return self._views(num_seqs, num_tokens, num_logits)

    @property
    def buffer(self) -> torch.Tensor:
        """The buffer every input of a step is a view of (what the other ranks receive each step)."""
        return self._device

    def packed_size(self, num_seqs: int, num_tokens: int, num_logits: int) -> int:
        """Values ``build`` writes for a batch of this size (the module's ``packed_size``)."""
        return packed_size(num_seqs, num_tokens, num_logits, self.max_pages_per_seq)

    def views(self, num_seqs: int, num_tokens: int, num_logits: int) -> BatchInputs:
        """The inputs of a batch already in ``buffer`` (written by ``build`` or received from rank 0)."""
        return self._views(num_seqs, num_tokens, num_logits)

    def _views(self, num_seqs: int, num_tokens: int, num_logits: int) -> BatchInputs:
        key = (num_seqs, num_tokens, num_logits)
        if key not in self._views_by_shape:
            if len(self._views_by_shape) >= 256:
                self._views_by_shape.clear()
            self._views_by_shape[key] = self._make_views(num_seqs, num_tokens, num_logits)
        views = self._views_by_shape[key]
        return BatchInputs(dict(views.named_args), views.num_tokens, views.num_seqs, views.num_logits)

    def _make_views(self, num_seqs: int, num_tokens: int, num_logits: int) -> BatchInputs:
        buf, B, T, G, P = self._device, num_seqs, num_tokens, num_logits, self.max_pages_per_seq
        offset = HEADER + 2 * (2 * T + G)
        wide = buf[HEADER: offset].view(torch.int64)
        views = {"input_ids": wide[:T].view(1, T), "position_ids": wide[T: 2 * T].view(1, T), "logits_idx": wide[2 * T:]}
        sizes = {"seq_len": B, "input_pos": B, "cu_seqlen": B + 1, "page_table": B * P, "slot_idx": B}
        for name, size in sizes.items():
            views[name] = buf[offset: offset + size]
            offset += size
        views["page_table"] = views["page_table"].view(B, P)
        return BatchInputs(views, num_tokens=T, num_seqs=B, num_logits=G)

    # ---- sample batches (cache sizing, graph capture); they only touch the scratch page/slot 0 ----

    def decode_batch(self, batch_size: int) -> BatchInputs:
        """``batch_size`` decode sequences of one token at position 0 in scratch page/slot 0."""
        return self.build([[0]] * batch_size, [0] * batch_size, [[0]] * batch_size, [0] * batch_size)
