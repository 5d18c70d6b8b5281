"""The matchers on real model shapes (shape cards), built and exported on meta in bf16: no weights."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from hf_zoo import run_pipeline


def meta_model(card: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    from autodeploy.models.cards import shape_card_path

    config = AutoConfig.for_model(**{**json.loads(shape_card_path(card).read_text()), **overrides})
    config.use_cache = False
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def transformed(card: str, **overrides):
    from autodeploy.export.export import export_to_gm

    model = meta_model(card, **overrides)
    gm = export_to_gm(model, max_batch_size=64, max_seq_len=8192)
    gm, report = run_pipeline(gm, model.config)
    return model.config, gm, report


def check(config, gm, moe: bool):
    layers = config.num_hidden_layers
    ops = Counter(str(n.target).split(".")[1] for n in gm.graph.nodes if str(n.target).startswith("autodeploy."))
    assert ops == Counter(attention=layers, rope=layers, rms_norm=2 * layers + 1, **({"moe": layers} if moe else {}))
    head_dim = config.hidden_size // config.num_attention_heads
    for node in gm.graph.nodes:
        if node.target is torch.ops.autodeploy.attention.default:
            q, k, v = (a.meta["val"] for a in node.args[:3])
            assert tuple(q.shape[2:]) == (config.num_attention_heads, head_dim)
            assert k.shape[2] == v.shape[2] == config.num_key_value_heads
            assert node.args[3] == pytest.approx(head_dim**-0.5) and node.args[4] is None and node.args[5] is None
        if node.target is torch.ops.autodeploy.rms_norm.default:
            assert node.args[2] == config.rms_norm_eps
    assert all(t.device.type == "meta" for t in gm.parameters())


@pytest.mark.parametrize("card,moe", [("llama3_8b", False), ("mixtral_8x7b", True)])
def test_real_widths_two_layers(card, moe):
    check(*transformed(card, num_hidden_layers=2)[:2], moe=moe)


@pytest.mark.slow
@pytest.mark.parametrize("card,moe", [("llama3_8b", False), ("mixtral_8x7b", True)])
def test_full_depth(card, moe):
    config, gm, report = transformed(card)
    check(config, gm, moe=moe)
    assert report["match_attention_pattern"].num_matches == config.num_hidden_layers
