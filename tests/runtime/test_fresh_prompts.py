"""The host facts ``SequenceInfo`` publishes for the attention ops: the batch's leading fresh
prompts (custom_ops/cached_attention/fresh_prompts.py), and when the ops may use them."""

import torch

from autodeploy.custom_ops.cached_attention import fresh_prompts
from autodeploy.runtime.sequence_info import SequenceInfo


def _build(info, seqs):
    """``seqs``: (cached, new) tokens per sequence."""
    return info.build([[5] * n for _, n in seqs], [p for p, _ in seqs], [[1, 2]] * len(seqs),
                      list(range(len(seqs))))


def test_build_publishes_the_leading_fresh_prompts():
    info = SequenceInfo(8, 64, 4)
    inputs = _build(info, [(0, 5), (0, 9), (4, 3), (0, 2), (7, 1)])  # a later chunk ends the run
    assert inputs.fresh == (2, 14, 9)
    f = fresh_prompts.lookup(inputs.named_args["cu_seqlen"], 20)
    assert (f.num_seqs, f.num_tokens, f.max_len) == (2, 14, 9)
    # other tensors with the same values, or another token count: not this step
    assert fresh_prompts.lookup(inputs.named_args["cu_seqlen"].clone(), 20) is None
    assert fresh_prompts.lookup(inputs.named_args["cu_seqlen"], 19) is None


def test_a_later_step_replaces_the_facts():
    info = SequenceInfo(8, 64, 4)
    first = _build(info, [(0, 5), (0, 9)])
    cu_first = first.named_args["cu_seqlen"]
    second = _build(info, [(3, 4), (0, 6)])  # starts with a later chunk: no leading fresh prompt
    assert second.fresh == (0, 0, 0)
    assert fresh_prompts.lookup(second.named_args["cu_seqlen"], 10) is None
    assert fresh_prompts.lookup(cu_first, 14) is None
    third = _build(info, [(0, 7), (0, 7)])  # same shape as the first: same views, the new facts
    assert third.named_args["cu_seqlen"].data_ptr() == cu_first.data_ptr()
    assert fresh_prompts.lookup(cu_first, 14).max_len == 7


def test_received_steps_publish_what_rank_0_sent():
    """A worker rank gets the buffer and the facts from rank 0 (distributed/ranks.py's header)."""
    info = SequenceInfo(8, 64, 4)
    sent = _build(info, [(0, 5), (0, 9), (7, 1)])
    fresh_prompts.publish(torch.zeros(3, dtype=torch.int32), 1, (0, 0, 0))  # as if another step ran
    got = info.views(3, 15, sent.fresh)
    assert fresh_prompts.lookup(got.named_args["cu_seqlen"], 15).num_tokens == 14


def test_switched_off_nothing_is_found(monkeypatch):
    info = SequenceInfo(8, 64, 4)
    inputs = _build(info, [(0, 5)])
    monkeypatch.setattr(fresh_prompts, "ENABLED", False)
    assert fresh_prompts.lookup(inputs.named_args["cu_seqlen"], 5) is None
