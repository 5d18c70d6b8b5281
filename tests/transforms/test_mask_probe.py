"""Mask classification by probing: causal and sliding masks are recognized, everything else is refused."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from autodeploy.transforms.patterns.mask_probe import classify_mask


def _causal(pos):
    return pos[:, None, :, None] >= pos[:, None, None, :]


MASKS = {
    "causal": _causal,
    "causal_additive": lambda pos: torch.where(_causal(pos), 0.0, float("-inf")),
    "causal_min_float": lambda pos: torch.zeros(()).masked_fill(~_causal(pos), torch.finfo(torch.float32).min),
    "sliding_6": lambda pos: _causal(pos) & (pos[:, None, None, :] > pos[:, None, :, None] - 6),
    "chunked_4": lambda pos: _causal(pos) & (pos[:, None, :, None] // 4 == pos[:, None, None, :] // 4),
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


@pytest.mark.parametrize("name,reason", [
    ("chunked_4", "neither causal nor sliding"),
    ("bidirectional", "neither causal nor sliding"),
    ("alibi_bias", "values other than 0"),
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
