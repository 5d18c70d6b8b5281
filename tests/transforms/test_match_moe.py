"""MoE matcher: experts it cannot express stay plain graph code (and still compute the same)."""

from __future__ import annotations

import torch

from hf_zoo import run_pipeline
from hf_zoo import COMMON, count_target, export, sample_inputs

moe_op = torch.ops.autodeploy.moe.default


def test_non_silu_experts_are_left_alone():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, hidden_act="gelu")
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    gm, report = run_pipeline(export(model), config)
    assert count_target(gm, moe_op) == 0
    assert "grouped_mm call(s) left as is" in report["match_moe_pattern"].note
    ids, pos = sample_inputs(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), model(input_ids=ids, position_ids=pos).logits, rtol=0, atol=1e-5)


def test_expert_parallel_sentinel_masks_are_part_of_the_chain():
    # transformers 5.17 always (5.24 with expert parallelism) masks sentinel ids: a ge/unsqueeze
    # mask, an in-place clamp_ of the sorted ids and masked_fill(_)s around the grouped_mms
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.mlp.experts._is_expert_parallel = True
    exported = export(model)
    assert count_target(exported, torch.ops.aten.clamp_.default) == 2
    gm, report = run_pipeline(exported, config)
    assert count_target(gm, moe_op) == 2, report["match_moe_pattern"].note
    left = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not {"aten.masked_fill.Scalar", "aten.masked_fill_.Scalar", "aten.clamp_.default", "aten.sort.default"} & left
    ids, pos = sample_inputs(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), model(input_ids=ids, position_ids=pos).logits, rtol=0, atol=1e-5)


def test_moe_op_takes_router_outputs_and_3d_experts(deployed):
    d = deployed("mixtral")
    for node in (n for n in d.gm.graph.nodes if n.target is moe_op):
        x, ids, weights, w_gate_up, w_down = (a.meta["val"] for a in node.args)
        assert x.dim() == 2 and ids.shape == weights.shape == (x.shape[0], 2)
        assert not ids.dtype.is_floating_point
        assert tuple(w_gate_up.shape) == (4, 64, 64) and tuple(w_down.shape) == (4, 64, 32)
        # the weights are the checkpoint's parameters, not copies
        assert node.args[3].op == "get_attr" and node.args[3].target.endswith("experts.gate_up_proj")
