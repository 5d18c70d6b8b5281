"""Attention matcher edge cases: what is folded into the op, and what must be left alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_zoo import run_pipeline
from hf_zoo import build_hf_model, count_target, export, export_module, sample_inputs

attention_op = torch.ops.autodeploy.attention.default
aten = torch.ops.aten


class TinyAttention(torch.nn.Module):
    """Embedding + one attention block, with the attention math chosen by ``kind``."""

    def __init__(self, kind: str, heads=4, kv_heads=2, head_dim=8, vocab=128):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.h, self.kv, self.d = kind, heads, kv_heads, head_dim
        self.emb = torch.nn.Embedding(vocab, heads * head_dim)
        self.q = torch.nn.Linear(heads * head_dim, heads * head_dim)
        self.k = torch.nn.Linear(heads * head_dim, kv_heads * head_dim)
        self.v = torch.nn.Linear(heads * head_dim, kv_heads * head_dim)
        self.rel_bias = torch.nn.Embedding(32, heads)  # a learned relative-position bias (T5-like)
        self.sinks = torch.nn.Parameter(torch.randn(heads))

    def forward(self, input_ids, position_ids):
        x = self.emb(input_ids)
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.d).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.d).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.d).transpose(1, 2)
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.kind == "bidirectional":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.kind == "is_causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.kind == "chunked":
            p = position_ids
            mask = (p[:, None, :, None] >= p[:, None, None, :]) & (p[:, None, :, None] // 4 == p[:, None, None, :] // 4)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.kind == "sdpa_alibi":  # MPT/Falcon style: ALiBi in SDPA's float mask, slopes computed in the graph
            p = position_ids
            slopes = torch.pow(torch.full((), 0.5), torch.arange(1, self.h + 1)).to(q.dtype)
            bias = slopes[None, :, None, None] * (p[:, None, None, :] - p[:, None, :, None]).to(q.dtype)
            mask = torch.where(p[:, None, :, None] >= p[:, None, None, :], bias, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # eager variants with a causal additive mask
            p = position_ids
            mask = torch.where(p[:, None, :, None] >= p[:, None, None, :], 0.0, float("-inf"))
            if self.kind == "eager_div":
                scores = q @ k.transpose(-1, -2) / math.sqrt(self.d)
            elif self.kind == "eager_prescaled_q":
                scores = (q * self.d**-0.5) @ k.transpose(2, 3)
            elif self.kind == "eager_scale_after_cap":
                scores = torch.tanh((q @ k.transpose(2, 3)) / 5.0) * 5.0 * 0.3
            elif self.kind in ("eager_relative_bias", "eager_sinks_relative_bias", "eager_sinks"):
                scores = q @ k.transpose(2, 3) * self.d**-0.5
            if "relative_bias" in self.kind:  # an extra additive bias that is neither a mask nor ALiBi
                rel = (p[:, :, None] - p[:, None, :]).clamp(0, 31)
                scores = scores + self.rel_bias(rel).permute(0, 3, 1, 2)
            scores = scores + mask
            if "sinks" in self.kind:  # gpt-oss: a learned logit per head joins the softmax, then is dropped
                sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1)
                scores = torch.cat([scores, sinks], dim=-1)
                probs = torch.softmax(scores - scores.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]
            else:
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
            out = probs @ v
        return out.transpose(1, 2).reshape(b, s, -1)


def _check(kind, expect_matches):
    module = TinyAttention(kind)
    gm, report = run_pipeline(export_module(module))
    assert count_target(gm, attention_op) == expect_matches
    for batch, seq in [(1, 1), (2, 9), (3, 12)]:
        ids, pos = sample_inputs(batch, seq)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids, pos), module(ids, pos), rtol=0, atol=1e-5)
    return gm, report


@pytest.mark.parametrize("kind", ["is_causal", "eager_div", "eager_prescaled_q"])
def test_causal_variants_become_the_op(kind):
    gm, _ = _check(kind, 1)
    (node,) = [n for n in gm.graph.nodes if n.target is attention_op]
    assert node.args[1].meta["val"].shape[2] == 2  # repeat_interleave folded: k keeps its 2 kv heads
    assert count_target(gm, aten.repeat_interleave.self_int) == 0


@pytest.mark.parametrize("name", ["llama_eager", "gemma2"])
def test_eager_masks_exported_on_meta_are_probed(name):
    # transformers 5.17 builds the additive mask with torch.tensor(0.0, device=...): on meta, a
    # lifted constant without a value, unless export patch scalar_tensor_literals keeps it an op
    model = build_hf_model(name).to("meta")
    gm, report = run_pipeline(export(model), model.config)
    assert count_target(gm, attention_op) == 2, report["match_attention_pattern"].note
    assert not [n.target for n in gm.graph.nodes if n.op == "get_attr" and "lifted_tensor" in n.target]


def test_aten_repeat_interleave_is_folded():
    # the export patch turns the head repeat into autodeploy::repeat_kv; the plain aten op (exported
    # without the patch, static shapes: torch 2.11 cannot keep seq dynamic through it) folds too
    module = TinyAttention("eager_div")
    ids, pos = sample_inputs(2, 8)
    with torch.no_grad():
        gm = torch.export.export(module.eval(), (ids, pos), strict=False).module()
    assert count_target(gm, aten.repeat_interleave.self_int) == 2
    gm, _ = run_pipeline(gm)
    (node,) = [n for n in gm.graph.nodes if n.target is attention_op]
    assert node.args[1].meta["val"].shape[2] == 2
    assert count_target(gm, aten.repeat_interleave.self_int) == 0
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), module(ids, pos), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,reason", [("bidirectional", "bidirectional")])
def test_non_causal_masks_are_left_alone(kind, reason):
    _, report = _check(kind, 0)
    assert reason in report["match_attention_pattern"].note


@pytest.mark.parametrize("kind,variant_args", [
    ("chunked", {8: 4}),  # attention_chunk_size
    ("eager_sinks", {6: "sinks"}),
    ("sdpa_alibi", {7: "alibi"}),
])
def test_variants_become_op_arguments(kind, variant_args):
    gm, report = _check(kind, 1)
    (node,) = [n for n in gm.graph.nodes if n.target is attention_op]
    for index, expected in variant_args.items():
        got = node.args[index]
        if expected == "sinks":
            assert got.op == "get_attr" and got.target == "sinks"
        elif expected == "alibi":
            assert tuple(got.meta["val"].shape) == (4,) and got.op == "call_function"  # computed in the graph
        else:
            assert got == expected
    assert report["match_attention_pattern"].note == ""


@pytest.mark.parametrize("kind,reason", [
    ("eager_relative_bias", "neither a 0/-inf mask nor ALiBi"),
    ("eager_sinks_relative_bias", "additive bias together with attention sinks"),
])
def test_unsupported_bias_stays_right_and_the_cached_build_names_it(kind, reason):
    """A bias the matcher cannot prove causal or ALiBi: the graph keeps it (same output), and the
    build with a KV cache stops naming the layer, never a silently different answer."""
    from autodeploy.runtime.kv_cache import CacheInterface
    from autodeploy.transforms.interface import BuildContext, TransformError
    from autodeploy.transforms.optimizer import InferenceOptimizer
    from hf_zoo import PATTERN_PIPELINE

    gm, report = _check(kind, 0)
    assert reason in report["match_attention_pattern"].note
    cached = {**PATTERN_PIPELINE, "insert_cached_attention": {"stage": "cache_init"},
              "initialize_cache": {"stage": "cache_init"}}
    ctx = BuildContext(cache=CacheInterface(2, 32, None, 8, "cpu"))
    with pytest.raises(TransformError, match=r"initialize_cache.*mixes tokens in plain graph code \(softmax"):
        InferenceOptimizer(cached)(ctx, model=export_module(TinyAttention(kind)))


def test_scale_after_soft_cap_is_not_folded():
    # the op applies scale before the cap; the other order must stay plain graph code
    _check("eager_scale_after_cap", 0)


def test_sliding_window_found_without_config():
    """The window comes from the mask itself when no factory config is available."""
    model = build_hf_model("qwen2_sliding")
    gm, _ = run_pipeline(export(model), config=None)
    windows = [n.args[4] for n in gm.graph.nodes if n.target is attention_op]
    assert windows == [None, 5]
    ids, pos = sample_inputs(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), model(input_ids=ids, position_ids=pos).logits, rtol=0, atol=1e-5)


def test_disabled_variants_are_not_matched():
    model = build_hf_model("llama_eager")
    transforms = {"match_attention_pattern": {"stage": "pattern_matcher", "match_eager": False}}
    gm, report = run_pipeline(export(model), transforms=transforms)
    assert report["match_attention_pattern"].num_matches == 0
    assert count_target(gm, attention_op) == 0


def test_alibi_in_bfloat16_is_alibi_up_to_its_rounding():
    """HF casts BLOOM's bias to the model dtype: in bf16 it is slope * j rounded, still ALiBi."""
    model = build_hf_model("bloom").to(device="meta", dtype=torch.bfloat16)
    gm, report = run_pipeline(export(model), model.config)
    nodes = [n for n in gm.graph.nodes if n.target is attention_op]
    assert len(nodes) == 2, report["match_attention_pattern"].note
    assert all(tuple(n.args[7].meta["val"].shape) == (4,) for n in nodes)
