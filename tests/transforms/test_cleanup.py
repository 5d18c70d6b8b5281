"""post_export cleanup: assertions and value-preserving ops go, everything else stays."""

from __future__ import annotations

from collections import Counter

import torch
from torch.export import Dim

from autodeploy.transforms.library.cleanup import remove_assertions, remove_noop_ops
from hf_zoo import run_pipeline
from hf_zoo import build_hf_model, export, sample_inputs

aten = torch.ops.aten


class NoopHeavy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        y = self.lin(x.to(torch.float32))  # no-op cast
        y = y[:, :, :]  # full slices
        y = y.view(y.shape)  # same-shape view
        y = self.drop(y)  # eval dropout
        z = y[..., :3].to(torch.float16).to(torch.float32)  # real slice and real casts
        return y.flatten(1), z


def _export(module, x):
    return torch.export.export(module.eval(), (x,), dynamic_shapes=({0: Dim("b", min=2, max=8)},)).module()


def ops(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def test_noop_ops_are_removed_and_real_ones_kept():
    module, x = NoopHeavy(), torch.randn(3, 5, 8)
    gm = _export(module, x)
    remove_assertions(gm)
    removed = remove_noop_ops(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    left = ops(gm)
    assert removed >= 4
    assert left[aten.dropout.default] == 0 and left[aten.view.default] == 0
    # the partial slice, both real casts and the dim-changing reshape stay
    assert left[aten.slice.Tensor] == 1
    assert sum(left[t] for t in (aten.to.dtype, aten._to_copy.default)) == 2
    for got, expected in zip(gm(x), module(x)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_hf_export_is_cleaned_and_unchanged():
    model = build_hf_model("llama")
    gm, report = run_pipeline(export(model), transforms={
        "cleanup_assertions": {"stage": "post_export"}, "cleanup_noop_ops": {"stage": "post_export"}})
    left = ops(gm)
    assert report["cleanup_noop_ops"].num_matches > 0
    assert left[aten._assert_tensor_metadata.default] == 0 and left[aten.alias.default] == 0
    # fp32 model: the only real cast left is RoPE's int64 positions -> float32
    casts = [n for n in gm.graph.nodes if n.target is aten.to.dtype]
    assert [n.args[0].meta["val"].dtype for n in casts] == [torch.int64]
    ids, pos = sample_inputs(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), model(input_ids=ids, position_ids=pos).logits, rtol=0, atol=0)
