"""rope_position_tables: cos/sin fed by position_ids alone become lookups into tables built once.

On the HF zoo (rotate-half, interleaved, partial rotary, scaled RoPE): the graph after the
transform gives exactly the logits of the graph before, reads tables instead of computing cos/sin,
and a pair that depends on another input is left alone.
"""

import copy

import pytest
import torch

from hf_zoo import SHAPES, build_hf_model, export, run_pipeline, sample_inputs

TABLES = {"rope_position_tables": {"stage": "post_load_fusion", "max_positions": 64}}
ROPE = "autodeploy.rope.default"


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", ["llama", "glm", "stablelm", "qwen3", "gemma2", "apertus"])
def test_tables_give_the_same_logits(name):
    hf = build_hf_model(name)
    gm, _ = run_pipeline(export(hf), hf.config)
    before = copy.deepcopy(gm)
    assert ROPE in _targets(before) and "aten.cos.default" in _targets(before)
    gm, report = run_pipeline(gm, hf.config, TABLES)
    assert report["rope_position_tables"].num_matches >= 1  # one cos/sin pair per layer at most
    after = _targets(gm)
    assert "aten.cos.default" not in after and "aten.sin.default" not in after
    assert after.count(ROPE) == _targets(before).count(ROPE)
    tables = [n for n, _ in gm.named_buffers() if n.startswith("rope_")]
    assert sorted(tables) == ["rope_cos_table_0", "rope_sin_table_0"]  # equal tables share one buffer
    assert gm.rope_cos_table_0.shape[0] == 64
    for batch, seq in SHAPES:
        ids, pos = sample_inputs(batch, seq, offset=5)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids, pos), before(ids, pos), rtol=0, atol=0)


def test_cos_sin_that_read_another_input_stay():
    hf = build_hf_model("llama")
    gm, _ = run_pipeline(export(hf), hf.config)
    rope = next(n for n in gm.graph.nodes if str(n.target) == ROPE)
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target != "position_ids")
    cos = rope.args[2]
    with gm.graph.inserting_before(rope):  # cos now also depends on input_ids: no table can hold it
        total = gm.graph.call_function(torch.ops.aten.sum.default, (ids,))
        zero = gm.graph.call_function(torch.ops.aten.mul.Tensor, (total, 0))
        shifted = gm.graph.call_function(torch.ops.aten.add.Tensor, (cos, zero))
    for n in gm.graph.nodes:
        if str(n.target) == ROPE:
            n.args = (n.args[0], n.args[1], shifted, *n.args[3:])
    gm.recompile()
    gm, report = run_pipeline(gm, hf.config, TABLES)
    assert report["rope_position_tables"].num_matches == 0
    assert "depend on more than position_ids" in report["rope_position_tables"].note
    assert "aten.cos.default" in _targets(gm)
