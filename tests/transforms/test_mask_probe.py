"""Mask classification by probing: causal, sliding and chunked masks and ALiBi biases are recognized,
everything else is refused."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from autodeploy.transforms.patterns.mask_probe import BiasTerm, classify_bias, classify_mask


def _causal(pos):
    return pos[:, None, :, None] >= pos[:, None, None, :]


def _index_chunks(pos, n):
    i = torch.arange(pos.shape[1], device=pos.device)
    return (i[:, None] // n == i[None, :] // n)[None, None]


MASKS = {
    "causal": _causal,
    "causal_additive": lambda pos: torch.where(_causal(pos), 0.0, float("-inf")),
    "causal_min_float": lambda pos: torch.zeros(()).masked_fill(~_causal(pos), torch.finfo(torch.float32).min),
    "sliding_6": lambda pos: _causal(pos) & (pos[:, None, None, :] > pos[:, None, :, None] - 6),
    "chunked_4": lambda pos: _causal(pos) & (pos[:, None, :, None] // 4 == pos[:, None, None, :] // 4),
    # chunks of the token index rather than the position (the same at run time: positions start at 0)
    "chunked_5_by_index": lambda pos: _causal(pos) & _index_chunks(pos, 5),
    "chunked_3000": lambda pos: _causal(pos) & (pos[:, None, :, None] // 3000 == pos[:, None, None, :] // 3000),
    "window_and_chunk": lambda pos: _causal(pos) & (pos[:, None, :, None] // 4 == pos[:, None, None, :] // 4)
    & (pos[:, None, None, :] > pos[:, None, :, None] - 3),
    "bidirectional": lambda pos: torch.ones(pos.shape[0], 1, pos.shape[1], pos.shape[1], dtype=torch.bool),
    "alibi_bias": lambda pos: torch.where(_causal(pos), -(pos[:, None, :, None] - pos[:, None, None, :]) * 0.5, float("-inf")),
    "per_head": lambda pos: _causal(pos).expand(-1, 2, -1, -1) & (torch.arange(2)[None, :, None, None] == 0),
    "sliding_20": lambda pos: _causal(pos) & (pos[:, None, None, :] > pos[:, None, :, None] - 20),
}


class MaskModule(torch.nn.Module):
    def __init__(self, fn, use_ids=False):
        super().__init__()
        self.fn, self.use_ids = fn, use_ids

    def forward(self, input_ids, position_ids):
        mask = self.fn(position_ids)
        if self.use_ids:  # a padding mask from token values
            mask = mask & (input_ids != 0)[:, None, None, :]
        return mask


def exported_mask(fn, use_ids=False):
    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=1, max=4096)
    ids = torch.zeros(2, 8, dtype=torch.long)
    pos = torch.arange(8).repeat(2, 1)
    gm = torch.export.export(MaskModule(fn, use_ids), (ids, pos), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})).module()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    while isinstance(result, (tuple, list)):
        result = result[0]
    return gm, result


@pytest.mark.parametrize("name,window", [("causal", None), ("causal_additive", None), ("causal_min_float", None), ("sliding_6", 6)])
def test_causal_and_sliding_are_recognized(name, window):
    gm, mask = exported_mask(MASKS[name])
    verdict = classify_mask(mask, gm)
    assert verdict.ok, verdict.reason
    assert verdict.sliding_window == window


@pytest.mark.parametrize("name,chunk", [("chunked_4", 4), ("chunked_5_by_index", 5)])
def test_chunked_masks_are_recognized(name, chunk):
    gm, mask = exported_mask(MASKS[name])
    verdict = classify_mask(mask, gm)
    assert verdict.ok, verdict.reason
    assert (verdict.chunk_size, verdict.sliding_window) == (chunk, None)


def test_chunk_beyond_probe_length_shows_through_shifted_positions():
    """A chunk computed from positions is probed with positions around the chunk boundary."""
    gm, mask = exported_mask(MASKS["chunked_3000"])
    verdict = classify_mask(mask, gm, max_probe_len=64)
    assert verdict.ok and verdict.chunk_size == 3000, verdict.reason


@pytest.mark.parametrize("name,reason", [
    ("bidirectional", "neither causal, sliding-window nor chunked"),
    ("window_and_chunk", "neither causal, sliding-window nor chunked"),
    ("alibi_bias", "ALiBi-like bias that is the same for every head"),
    ("per_head", "differs between heads"),
])
def test_other_masks_are_refused(name, reason):
    gm, mask = exported_mask(MASKS[name])
    verdict = classify_mask(mask, gm)
    assert not verdict.ok and reason in verdict.reason


def test_padding_mask_from_token_values_is_refused():
    gm, mask = exported_mask(MASKS["causal"], use_ids=True)
    verdict = classify_mask(mask, gm)
    assert not verdict.ok and "values of input" in verdict.reason


def test_window_beyond_probe_length_needs_the_config():
    gm, mask = exported_mask(MASKS["sliding_20"])
    assert classify_mask(mask, gm).sliding_window == 20  # probed at 21, 22
    refused = classify_mask(mask, gm, max_probe_len=16)
    assert not refused.ok and "beyond max_probe_len" in refused.reason
    trusted = classify_mask(mask, gm, max_probe_len=16, config_windows=[20])
    assert trusted.ok and trusted.sliding_window == 20


def test_no_mask():
    gm, _ = exported_mask(MASKS["causal"])
    assert classify_mask(None, gm, is_causal=True).ok
    assert not classify_mask(None, gm, is_causal=False).ok


class BiasModule(torch.nn.Module):
    """A causal mask plus a bias of 4 heads, as separate outputs (the two terms of the scores)."""

    def __init__(self, bias):
        super().__init__()
        self.bias = bias

    def forward(self, input_ids, position_ids):
        p = position_ids
        mask = torch.where(_causal(p), 0.0, torch.finfo(torch.float32).min)
        slopes = torch.pow(torch.full((), 0.5), torch.arange(1, 5))
        return mask, self.bias(p, slopes)


BIASES = {
    # BLOOM: slope * key position; relative: slope * (j - i); both are ALiBi
    "alibi_absolute": lambda p, slopes: slopes[None, :, None, None] * p[:, None, None, :].float(),
    "alibi_relative": lambda p, slopes: slopes[None, :, None, None] * (p[:, None, None, :] - p[:, None, :, None]).float(),
    "row_constant": lambda p, slopes: p[:, None, :, None].float().expand(-1, 4, -1, -1) * 0.1,
    "quadratic": lambda p, slopes: slopes[None, :, None, None] * (p[:, None, None, :] - p[:, None, :, None]).float() ** 2,
    "learned_table": lambda p, slopes: torch.sin(p[:, None, :, None] * 1.3 + p[:, None, None, :] * 0.7).expand(-1, 4, -1, -1),
}


def exported_terms(bias):
    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=1, max=4096)
    ids = torch.zeros(2, 8, dtype=torch.long)
    pos = torch.arange(8).repeat(2, 1)
    gm = torch.export.export(BiasModule(bias), (ids, pos), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})).module()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    mask, bias_node = output.args[0]
    return gm, [BiasTerm(mask), BiasTerm(bias_node)]


@pytest.mark.parametrize("name", ["alibi_absolute", "alibi_relative"])
def test_alibi_is_recognized_with_its_slopes_tensor(name):
    gm, terms = exported_terms(BIASES[name])
    verdict = classify_bias(terms, gm, heads=4)
    assert verdict.ok, verdict.reason
    node = verdict.alibi_slopes
    assert node is not None and tuple(node.meta["val"].shape) == (4,)  # the [H] slopes, not a view of them
    # attention with sinks sees a row constant: only an exactly zero bias would do
    assert not classify_bias(terms, gm, heads=4, row_shift_ok=False).ok


def test_row_constant_bias_is_dropped_without_sinks():
    """softmax(x + c_i) == softmax(x): a bias constant along each query row changes nothing."""
    gm, terms = exported_terms(BIASES["row_constant"])
    verdict = classify_bias(terms, gm, heads=4)
    assert verdict.ok and verdict.alibi_slopes is None
    assert not classify_bias(terms, gm, heads=4, row_shift_ok=False).ok


@pytest.mark.parametrize("name", ["quadratic", "learned_table"])
def test_other_biases_are_refused(name):
    gm, terms = exported_terms(BIASES[name])
    verdict = classify_bias(terms, gm, heads=4)
    assert not verdict.ok and "neither a 0/-inf mask nor ALiBi" in verdict.reason
