"""Transpose/permute pairs that cancel are removed; others stay."""

from __future__ import annotations

import torch

from autodeploy.transforms.library.eliminate_transposes import eliminate_transpose_pairs

aten = torch.ops.aten


class Chains(torch.nn.Module):
    def forward(self, x):
        a = x.transpose(1, 2).transpose(2, 1)  # cancels
        b = x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)  # cancels
        c = x.transpose(1, 2).transpose(1, 3)  # does not cancel
        d = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2)  # through a no-op reshape
        return a + b + d, c


def test_cancelling_pairs_are_removed():
    x = torch.randn(2, 3, 4, 5)
    gm = torch.export.export(Chains(), (x,)).module()
    expected = gm(x)
    assert eliminate_transpose_pairs(gm) == 3
    gm.graph.eliminate_dead_code()
    gm.recompile()
    left = [n for n in gm.graph.nodes if n.target in (aten.transpose.int, aten.permute.default)]
    assert len(left) == 2  # the non-cancelling pair
    for got, want in zip(gm(x), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
