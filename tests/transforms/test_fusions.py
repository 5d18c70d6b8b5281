"""The post_load_fusion transforms on the HF zoo: equal outputs, the graph before/after, memory.

Every variant runs the pattern pipeline plus the four fusions; the fused graph's logits (only the
last token's, see gather_last_token_logits) must equal HF eager's last-token logits. The tiny
families through the real default.yaml are in test_tiny_families.py, end to end (greedy == HF,
cached graph) in tests/runtime (tiny_deployment.py runs every fusion).
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections import Counter

import pytest
import torch
from torch import nn

import autodeploy.custom_ops.add_rms_norm  # noqa: F401
import autodeploy.custom_ops.last_tokens  # noqa: F401
import autodeploy.custom_ops.silu_mul  # noqa: F401
from autodeploy.transforms.library import fuse_linears
from hf_zoo import SHAPES, build_hf_model, export, export_module, run_pipeline, sample_inputs

aten, ops = torch.ops.aten, torch.ops.autodeploy
FUSIONS = {name: {"stage": "post_load_fusion"} for name in
           ("fuse_add_rms_norm", "fuse_parallel_linears", "fuse_silu_mul", "gather_last_token_logits")}

# per variant (2 layers): add+norm pairs, linear groups (their sizes), silu_mul; the tiny Llama,
# Mixtral and hybrid families run the same checks through default.yaml (test_tiny_families.py)
EXPECTED = {
    "llama": (4, [3, 2] * 2, 2),  # q/k/v and gate/up; the first norm reads the embedding (no add)
    "qwen2_moe": (4, [3, 4] * 2, 2),  # q/k/v with biases; router + shared gate/up + shared-expert gate
    "glm": (4, [3] * 2, 2),  # gate_up_proj is one linear already: its chunk(2) feeds silu_mul
    "gemma2": (4, [3, 2] * 2, 0),  # (1 + w) norms computed late; GeGLU is no silu_mul; soft-capped logits
}


def _counts(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def variant(request):
    hf = build_hf_model(request.param)
    gm, _ = run_pipeline(export(hf), hf.config)
    before = _counts(gm)
    fused, report = run_pipeline(gm, hf.config, FUSIONS)
    return request.param, hf, before, fused, report


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_fused_graph_equals_hf_last_token(variant, batch, seq):
    _, hf, _, gm, _ = variant
    ids, pos = sample_inputs(batch, seq)
    with torch.no_grad():
        ours = gm(ids, pos)
        ref = hf(input_ids=ids, position_ids=pos).logits[:, -1:]
    assert ours.shape == ref.shape  # [B, 1, V]: the head ran for the last tokens only
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_graph_before_and_after(variant):
    name, _, before, gm, report = variant
    after = _counts(gm)
    add_norms, group_sizes, silu_muls = EXPECTED[name]
    groups = len(group_sizes)
    assert [report[k].num_matches for k in FUSIONS] == [add_norms, groups, silu_muls, 1]
    assert after["autodeploy.fused_add_rms_norm.default"] == add_norms
    assert after["autodeploy.rms_norm.default"] == before["autodeploy.rms_norm.default"] - add_norms
    assert after["autodeploy.silu_mul.default"] == silu_muls
    assert after["aten.silu.default"] == before["aten.silu.default"] - silu_muls
    assert after["autodeploy.last_tokens.default"] == 1
    # no parameter of a fused linear is left behind (they were concatenated, then deleted)
    names = [n for n, _ in gm.named_parameters()]
    fused_params = [n for n in names if ".fused_" in n]
    assert len(fused_params) == groups + sum("bias" in n for n in fused_params)
    if name == "llama":
        assert not any(n.endswith(("q_proj.weight", "k_proj.weight", "gate_proj.weight")) for n in names)


def test_parallel_linear_count(variant):
    """Each group of n linears became one: the linear count drops by (n - 1) per group."""
    name, _, before, gm, _ = variant
    group_sizes = EXPECTED[name][1]
    assert _counts(gm)["aten.linear.default"] == before["aten.linear.default"] - sum(n - 1 for n in group_sizes)


# ---- fuse_parallel_linears on hand-made graphs: what it must leave alone, sharded shapes, memory


class ThreeHeads(nn.Module):
    """Three linears on one input, one with its weight tied to a fourth, one in another dtype."""

    def __init__(self, tie=False, other_dtype=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(128, 16)
        self.a, self.b, self.c = nn.Linear(16, 8, bias=False), nn.Linear(16, 4, bias=False), nn.Linear(16, 4, bias=False)
        self.d = nn.Linear(16, 4, bias=False)
        if tie:
            self.d.weight = self.c.weight
        self.other_dtype = other_dtype

    def forward(self, input_ids, position_ids):
        x = self.emb(input_ids)
        c = self.c(x.double()).float() if self.other_dtype else self.c(x)
        return torch.cat([self.a(x), self.b(x), c, self.d(x * 2)], dim=-1)


def _fuse(module):
    gm = export_module(module)
    if module.other_dtype:
        module.c.double()
        gm.c.double()
    fused, report = run_pipeline(gm, transforms={"fuse_parallel_linears": {"stage": "post_load_fusion"}})
    return fused, report["fuse_parallel_linears"]


def test_tied_and_mixed_dtype_weights_are_left_alone():
    for kwargs, expected_group in [({}, "3"), ({"tie": True}, "2"), ({"other_dtype": True}, "2")]:
        module = ThreeHeads(**kwargs)
        gm, record = _fuse(module)
        assert record.num_matches == 1 and f"groups of {expected_group} linears" in record.note, kwargs
        ids, pos = sample_inputs(2, 5)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids, pos), module(ids, pos))


def test_fuses_local_shards_after_sharding():
    """Split sizes come from the weights as they are at fusion time (after sharding: local shards)."""
    module = ThreeHeads()
    gm = export_module(module)
    for name, rows in (("a", slice(0, 4)), ("b", slice(2, 4)), ("c", slice(0, 2)), ("d", slice(0, 4))):
        getattr(gm, name).weight = nn.Parameter(getattr(module, name).weight.detach()[rows].clone())
    ids, pos = sample_inputs(2, 5)
    with torch.no_grad():
        expected = gm(ids, pos)  # [2, 5, 4 + 2 + 2 + 4] from the "local" weights
    fused, record = run_pipeline(gm, transforms={"fuse_parallel_linears": {"stage": "post_load_fusion"}})
    assert record["fuse_parallel_linears"].num_matches == 1
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, pos), expected)


def test_each_group_frees_its_weights_before_the_next(monkeypatch):
    hf = build_hf_model("llama")
    gm, _ = run_pipeline(export(hf), hf.config)
    for name, t in list(gm.named_parameters()):  # own copies, as load_weights gives (export shares HF's)
        owner, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(owner), attr, nn.Parameter(t.detach().clone(), requires_grad=False))
    originals = {n: weakref.ref(t) for n, t in gm.named_parameters() if n.endswith(("_proj.weight",))
                 and not n.endswith(("o_proj.weight", "down_proj.weight"))}
    assert len(originals) == 2 * 5  # q, k, v, gate, up per layer
    alive_after_each_group = []
    real_fuse_group = fuse_linears.fuse_group

    def fuse_group(gm_, group, editor):
        real_fuse_group(gm_, group, editor)
        gc.collect()
        alive_after_each_group.append(sum(ref() is not None for ref in originals.values()))

    monkeypatch.setattr(fuse_linears, "fuse_group", fuse_group)
    run_pipeline(gm, transforms={"fuse_parallel_linears": {"stage": "post_load_fusion"}})
    # groups (q,k,v), (gate,up) per layer: the old tensors die group by group, not at the end
    assert alive_after_each_group == [7, 5, 2, 0]


# ---- fuse_silu_mul on hand-made graphs and on a graph moved to another device


class GateUp(nn.Module):
    """One gate/up linear cut by ``torch.split`` (export: ``split.Tensor``) or ``chunk``; with
    ``parts=3`` silu*mul reads the last two of three parts (a slice of the GEMM output)."""

    def __init__(self, cut, parts=2):
        super().__init__()
        torch.manual_seed(0)
        self.cut, self.parts = cut, parts
        self.emb, self.gate_up = nn.Embedding(128, 16), nn.Linear(16, 8 * parts, bias=False)

    def forward(self, input_ids, position_ids):
        y = self.gate_up(self.emb(input_ids))
        parts = torch.split(y, 8, dim=-1) if self.cut == "split" else y.chunk(self.parts, dim=-1)
        return nn.functional.silu(parts[-2]) * parts[-1] + parts[0]


@pytest.mark.parametrize("cut,parts", [("split", 2), ("split", 3), ("chunk", 2), ("chunk", 3)])
def test_silu_mul_on_split_and_chunk(cut, parts):
    module = GateUp(cut, parts)
    gm = export_module(module)
    split_op = aten.split.Tensor if cut == "split" else aten.chunk.default
    assert _counts(gm)[str(split_op)] == 1  # the form this case is about
    fused, report = run_pipeline(gm, transforms={"fuse_silu_mul": {"stage": "post_load_fusion"}})
    assert report["fuse_silu_mul"].num_matches == 1 and _counts(fused)["aten.silu.default"] == 0
    ids, pos = sample_inputs(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, pos), module(ids, pos), rtol=0, atol=0)


def test_silu_mul_after_the_graph_moved_to_another_device():
    """What tests/gpu/test_fusions_gpu.py does, moved to meta instead of CUDA: after ``move_graph``
    the nodes' fake values are on the old device, so ``fuse_parallel_linears`` cannot give its GEMM
    one, and fuse_silu_mul (which reads it) found nothing until it asked for shape propagation."""
    from autodeploy.models.materialize import move_graph
    from autodeploy.transforms.library.fuse_silu_mul import describe_silu_sites

    hf = build_hf_model("llama").to(torch.bfloat16)
    exported, _ = run_pipeline(export(hf), hf.config)
    for options, expected in [({"requires_shape_prop": False}, 0), ({}, 2)]:  # {}: the default asks for it
        gm = move_graph(copy.deepcopy(exported), "meta")
        transforms = {"fuse_parallel_linears": {"stage": "post_load_fusion"},
                      "fuse_silu_mul": {"stage": "post_load_fusion", **options}}
        fused, report = run_pipeline(gm, hf.config, transforms)
        assert report["fuse_parallel_linears"].num_matches == 4 and report["fuse_silu_mul"].num_matches == expected
    sites = describe_silu_sites(run_pipeline(move_graph(copy.deepcopy(exported), "meta"), hf.config, {
        "fuse_parallel_linears": {"stage": "post_load_fusion"}})[0]).splitlines()
    assert len(sites) == 2 and all("mul.Tensor(silu, split_with_sizes_default" in s and "(no val)" in s for s in sites)
