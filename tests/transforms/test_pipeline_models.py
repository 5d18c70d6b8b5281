"""Cleanup + pattern matchers on real HF architectures: exact logits and the right canonical ops."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hf_zoo import NUM_LAYERS, SHAPES, VARIANTS, export_module, sample_inputs

aten = torch.ops.aten
NAMES = list(VARIANTS)


def canonical_ops(gm) -> Counter:
    return Counter(
        str(n.target).split(".")[1] for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("autodeploy.")
    )


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_eager(name, deployed):
    d = deployed(name)
    for batch, seq in SHAPES:
        ids, pos = sample_inputs(batch, seq)
        with torch.no_grad():
            expected = d.hf(input_ids=ids, position_ids=pos).logits
            got = d.gm(ids, pos)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"{name} at (batch, seq)=({batch}, {seq})")


@pytest.mark.parametrize("name", NAMES)
def test_one_attention_and_rope_per_layer(name, deployed):
    d = deployed(name)
    ops = canonical_ops(d.gm)
    assert ops["attention"] == len(d.variant.attention_args)
    assert ops["rope"] == d.variant.ropes
    assert ops["rms_norm"] == d.variant.rms_norms
    assert ops["moe"] == d.variant.moes
    ssm_ops = ("causal_conv1d", "ssm_scan", "selective_scan")
    assert {op: ops[op] for op in ssm_ops} == {op: d.variant.ssm_ops.get(op, 0) for op in ssm_ops}
    # nothing of HF's attention or experts is left: no SDPA, no softmax over scores, no grouped_mm
    experts_ok = d.variant.experts_as_graph_code
    leftovers = [n for n in d.gm.graph.nodes if n.op == "call_function" and (
        n.target in (aten.scaled_dot_product_attention.default, torch.ops.autodeploy.sdpa.default)
        or (n.target is aten.softmax.int and n.meta["val"].dim() == 4)  # the router's softmax is 2-D
        or (("grouped_mm" in str(n.target)) and not experts_ok))]
    assert leftovers == []
    assert d.report["match_attention_pattern"].note == ""


@pytest.mark.parametrize("name", NAMES)
def test_attention_carries_window_and_softcap(name, deployed):
    d = deployed(name)
    nodes = [n for n in d.gm.graph.nodes if n.target is torch.ops.autodeploy.attention.default]
    got = [(n.args[4], n.args[5]) for n in nodes]
    assert got == d.variant.attention_args
    cfg = d.hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for n in nodes:
        q, k, v = (a.meta["val"] for a in n.args[:3])
        # bsnd, GQA inside: k/v keep their own (un-repeated) head count
        assert (q.shape[2], q.shape[3]) == (cfg.num_attention_heads, head_dim)
        kv_heads = d.variant.kv_heads() if callable(d.variant.kv_heads) else d.variant.kv_heads
        assert k.shape[2] == v.shape[2] == (kv_heads or cfg.num_key_value_heads)


@pytest.mark.parametrize("name", NAMES)
def test_attention_carries_sinks_alibi_and_chunks(name, deployed):
    """Per-head tensors ([H], heads first, so tensor parallelism can slice them) and chunk sizes."""
    d = deployed(name)
    nodes = [n for n in d.gm.graph.nodes if n.target is torch.ops.autodeploy.attention.default]
    args = [dict(zip(("sinks", "alibi_slopes", "attention_chunk_size"), (list(n.args) + [None] * 9)[6:9])) for n in nodes]
    got = [(a["sinks"] is not None, a["alibi_slopes"] is not None, a["attention_chunk_size"]) for a in args]
    assert got == (d.variant.attention_variants or [(False, False, None)] * len(d.variant.attention_args))
    heads = d.hf.config.num_attention_heads
    for a in args:
        for name in ("sinks", "alibi_slopes"):
            if a[name] is not None:
                assert tuple(a[name].meta["val"].shape) == (heads,)
        if a["sinks"] is not None:  # the model's own parameter, loaded with the weights
            assert a["sinks"].op == "get_attr" and a["sinks"].target.endswith("self_attn.sinks")


@pytest.mark.parametrize("name", ["llama", "llama_eager", "mixtral", "glm"])
def test_attention_path_has_no_transposes(name, deployed):
    gm = deployed(name).gm
    for n in gm.graph.nodes:
        if n.target in (torch.ops.autodeploy.attention.default, torch.ops.autodeploy.rope.default):
            for a in n.all_input_nodes:
                assert a.target not in (aten.transpose.int, aten.permute.default), f"{n.name} input {a.name}"
        if n.target is torch.ops.autodeploy.attention.default:
            assert all(u.target not in (aten.transpose.int, aten.permute.default) for u in n.users)


def test_rope_flags(deployed):
    for name, interleaved, rot_dim in [("llama", False, 16), ("glm", True, 8), ("stablelm", False, 4)]:
        gm = deployed(name).gm
        nodes = [n for n in gm.graph.nodes if n.target is torch.ops.autodeploy.rope.default]
        assert [n.args[4] for n in nodes] == [interleaved] * NUM_LAYERS, name
        assert {n.args[2].meta["val"].shape[-1] for n in nodes} == {rot_dim}, name


def test_transformed_graph_reexports_with_dynamic_shapes(deployed):
    from torch.export import Dim

    d = deployed("mixtral")
    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=1, max=64)
    ids, pos = sample_inputs(2, 8)
    with torch.no_grad():
        program = torch.export.export(d.gm, (ids, pos), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), strict=False)
        ids, pos = sample_inputs(3, 5)
        torch.testing.assert_close(program.module()(ids, pos), d.gm(ids, pos), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mixtral", "glm"])
def test_matchers_leave_valid_shapes(name, deployed):
    """The matchers report valid shapes (no re-propagation needed): their values must equal a fresh propagation."""
    from autodeploy.transforms.graph_utils import run_shape_prop

    gm = deployed(name).gm
    before = {n.name: n.meta.get("val") for n in gm.graph.nodes if n.op == "call_function"}
    assert all(v is not None for v in before.values())
    run_shape_prop(gm)
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.meta["val"], torch.Tensor):
            continue
        old, new = before[n.name], n.meta["val"]
        assert (str(tuple(old.shape)), old.dtype) == (str(tuple(new.shape)), new.dtype), n.name


@pytest.mark.parametrize("requires_grad", [False, True])
def test_shape_prop_keeps_linear_dynamic(requires_grad):
    # torch 2.11's C++ linear/matmul on a symbolic [B, S, H] input calls numel() (frozen weights)
    # or specializes B and S (weights that require grad) unless it decomposes in Python
    from autodeploy.transforms.graph_utils import run_shape_prop

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = torch.nn.Embedding(128, 16), torch.nn.Linear(16, 24, bias=False)

        def forward(self, input_ids, position_ids):
            return self.proj(self.emb(input_ids))

    gm = export_module(Block())
    for p in gm.parameters():
        p.requires_grad_(requires_grad)
    run_shape_prop(gm)
    (out,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    batch, seq, width = out.meta["val"].shape
    assert isinstance(batch, torch.SymInt) and isinstance(seq, torch.SymInt) and width == 24
