"""The sharding plan on meta, in one process (no ranks): real model shapes, source priority,
partial configs, grids, head counts that do not divide, and config errors before model work."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from autodeploy.build import plan_sharding
from autodeploy.config import ConfigError, compose_experiment
from autodeploy.sharding.layout import LayoutError, Part, local_ranges, split_layout

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


def _plan(model: str, world: int, *overrides: str):
    cfg = compose_experiment([f"model={model}", f"args.world_size={world}", *overrides])
    built = plan_sharding(cfg.args)
    return built.sharding, {r.target: r for r in built.sharding.rows()}


def test_part_split_and_replication():
    assert local_ranges((Part(64, 16),), 1, 2) == [(32, 64)]
    # 2 KV heads on 4 ranks: ranks 0,1 share head 0 and ranks 2,3 share head 1
    assert [local_ranges((Part(32, 16),), r, 4) for r in range(4)] == [[(0, 16)], [(0, 16)], [(16, 32)], [(16, 32)]]
    # [q | k | v] fused: each component split on its own
    assert local_ranges((Part(64, 16), Part(32, 16), Part(32, 16)), 1, 2) == [(32, 64), (80, 96), (112, 128)]
    with pytest.raises(LayoutError):
        Part(48, 16).pieces(2)  # 3 heads over 2 ranks
    assert split_layout((Part(64, 16), Part(32, 16), Part(32, 16)), [64, 64]) == [(Part(64, 16),), (Part(32, 16), Part(32, 16))]


def test_llama_8b_at_world_size_8():
    plan, rows = _plan("llama3_8b", 8)
    for proj, strategy in [("q_proj", "colwise"), ("k_proj", "colwise"), ("v_proj", "colwise"), ("o_proj", "rowwise")]:
        assert rows[f"model.layers.7.self_attn.{proj}"].strategy == strategy
    for proj, strategy in [("gate_proj", "colwise"), ("up_proj", "colwise"), ("down_proj", "rowwise")]:
        assert rows[f"model.layers.31.mlp.{proj}"].strategy == strategy
    hidden, inter, kv, vocab, layers, bf16 = 4096, 14336, 1024, 128256, 32, 2
    assert rows["model.layers.0.self_attn.q_proj"].bytes_per_rank == hidden * hidden * bf16 // 8
    assert rows["model.layers.0.self_attn.k_proj"].bytes_per_rank == kv * hidden * bf16 // 8
    assert rows["lm_head"].strategy == "gather"
    summary = plan.summary()
    sharded = (layers * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter) + vocab * hidden) * bf16
    replicated = (vocab * hidden + (2 * layers + 1) * hidden) * bf16  # embedding and norms
    assert summary["bytes_total"] == sharded + replicated
    assert summary["bytes_per_rank_max"] == sharded // 8 + replicated
    assert summary["collectives_per_forward"] == 2 * layers + 1


def test_mixtral_at_world_size_4_with_an_ep_tp_grid():
    plan, rows = _plan("mixtral_8x7b", 4, "sharding=ep_tp_grid")
    experts = rows["model.layers.3.mlp.experts"]
    assert (experts.strategy, experts.dim, experts.source) == ("ep", "ep", "heuristic")
    hidden, inter, bf16 = 4096, 14336, 2
    assert experts.bytes_per_rank == 8 * 3 * hidden * inter * bf16 // 4  # 4 experts per EP group, half of each
    assert rows["model.layers.3.mlp.gate"].strategy == "replicate"  # the router
    # ranks [0,1] form one EP group (the last key, tp, has stride one): same experts, different halves
    edits = {r: {e.fqn: e.ranges for e in plan.edits(r) if hasattr(e, "fqn") and e.fqn.endswith("layers.0.mlp.experts.down_proj")}
             for r in range(4)}
    down = "model.layers.0.mlp.experts.down_proj"
    assert edits[0][down] == ((0, 0, 4), (2, 0, 7168)) and edits[1][down] == ((0, 0, 4), (2, 7168, 14336))
    assert edits[2][down] == ((0, 4, 8), (2, 0, 7168))


def test_grid_order_decides_the_rank_layout():
    plan, _ = _plan("tiny_mixtral", 4, "args.device=cpu", "sharding=ep", "++args.transforms.detect_sharding.process_grid={tp: 2, ep: 2}")
    experts = {r: [e.ranges for e in plan.edits(r) if getattr(e, "fqn", "").endswith("layers.0.mlp.experts.down_proj")][0]
               for r in range(4)}
    # {tp, ep}: ep has stride one, so ranks 0 and 2 hold the same experts
    assert experts[0][0] == experts[2][0] == (0, 0, 2) and experts[1][0] == (0, 2, 4)


def test_invalid_grid_warns_and_uses_1d_ep(caplog):
    with caplog.at_level(logging.WARNING, logger="autodeploy.sharding"):
        plan, rows = _plan("tiny_mixtral", 4, "args.device=cpu", "sharding=ep", "++args.transforms.detect_sharding.process_grid={ep: 3, tp: 2}")
    assert "ep (3) x tp (2) != world_size (4)" in caplog.text
    assert rows["model.layers.0.mlp.experts"].strategy == "ep"
    assert rows["model.layers.0.mlp.experts"].bytes_per_rank == 4 * 3 * 64 * 96 * 4 // 4  # one expert per rank


MANUAL_ATTENTION = ("++args.transforms.detect_sharding.manual_config={head_dim: 16, tp_plan: {q_proj: colwise, "
                    "k_proj: colwise, v_proj: colwise, o_proj: rowwise}}")


def test_source_priority_first_claim_wins():
    _, rows = _plan("tiny_llama", 2, "args.device=cpu", MANUAL_ATTENTION)
    assert rows["model.layers.0.self_attn.q_proj"].source == "manual"
    assert rows["model.layers.0.mlp.down_proj"].source == "factory"  # not in the manual plan
    assert rows["lm_head"].source == "heuristic"
    _, rows = _plan("tiny_llama", 2, "args.device=cpu", MANUAL_ATTENTION,
                    "args.transforms.detect_sharding.sharding_source=[heuristic,manual,factory]")
    assert {r.source for r in rows.values()} == {"heuristic"}


def test_partial_config_rejected_when_not_supported(caplog):
    with caplog.at_level(logging.WARNING, logger="autodeploy.sharding"):
        _, rows = _plan("tiny_llama", 2, "args.device=cpu", MANUAL_ATTENTION,
                        "args.transforms.detect_sharding.support_partial_config=false")
    assert "does not cover every layer" in caplog.text and "mlp" in caplog.text
    assert rows["model.layers.0.self_attn.q_proj"].source == "factory"


def test_pattern_that_matches_nothing_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="autodeploy.sharding"):
        _, rows = _plan("tiny_llama", 2, "args.device=cpu",
                        "++args.transforms.detect_sharding.manual_config={tp_plan: {qkv_proj: colwise, o_proj: rowwise}}")
    assert "pattern 'qkv_proj' matches no linear layer" in caplog.text


def test_world_size_that_does_not_divide_heads_falls_back(caplog):
    # 4 query heads on 8 ranks cannot be split by heads: the attention linears are simple-sharded
    with caplog.at_level(logging.INFO, logger="autodeploy.sharding"):
        _, rows = _plan("tiny_llama", 8, "args.device=cpu", "args.transforms.detect_sharding.sharding_source=[heuristic]")
    assert rows["model.layers.0.self_attn.q_proj"].strategy == "gather"
    assert rows["model.layers.0.mlp.gate_proj"].strategy == "colwise"  # 128 / 8 is fine
    assert "not split column/row" in caplog.text
    # 3 ranks divide nothing of tiny_llama: everything stays whole rather than split unevenly
    _, rows = _plan("tiny_llama", 3, "args.device=cpu")
    assert {r.strategy for r in rows.values()} == {"replicate"}


@pytest.mark.parametrize("override,message", [
    ("args.transforms.detect_sharding.sharding_source=[manual,foo]", "unknown value(s) ['foo'] (valid: manual, factory, heuristic)"),
    ("args.transforms.detect_sharding.sharding_dims=[tp,xp]", "unknown value(s) ['xp'] (valid: tp, ep, bmm, ssm)"),
    ("++args.transforms.detect_sharding.manual_config={tp_plan: {q_proj: diagonal}}", "unknown strategy"),
    ("++args.transforms.detect_sharding.process_grid={ep: 2, pp: 2}", "unknown value(s) ['pp']"),
])
def test_bad_sharding_options_fail_at_config_time(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        compose_experiment(["model=tiny_llama", "args.world_size=2", override])


def test_bad_strategy_on_the_command_line_is_one_line_before_model_work():
    proc = subprocess.run([sys.executable, "launch.py", "model=llama3_70b", "args.world_size=8",
                           "++args.transforms.detect_sharding.manual_config={tp_plan: {q_proj: diagonal}}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown strategy" in proc.stderr and "colwise, rowwise, mamba, gather, replicate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_only_70b_on_one_cpu_process(tmp_path):
    """The issue's command: size a 70B deployment on 8 ranks without GPUs or weights."""
    proc = subprocess.run([sys.executable, "launch.py", "model=llama3_70b", "args.world_size=8", "plan_only=true",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["plan_only"] is True and "generations" not in results
    summary = results["sharding_summary"]
    assert summary["world_size"] == 8 and summary["collectives_per_forward"] == 2 * 80 + 1
    assert 17 * GiB < summary["bytes_per_rank_max"] < 19 * GiB < 131 * GiB < summary["bytes_total"]
    assert {"target", "strategy", "source", "dim", "bytes_per_rank"} == set(results["sharding_plan"][0])
    assert "at most 18.14 GiB per rank" in proc.stdout
