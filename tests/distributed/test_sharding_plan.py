"""The sharding plan on meta, in one process (no ranks): real model shapes, source priority,
partial configs, grids, head counts that do not divide, and config errors before model work."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autodeploy.build import plan_sharding
from autodeploy.config import ConfigError, compose_experiment, experiment, find_user_error
from autodeploy.sharding import format_table
from autodeploy.sharding.detect import pattern_matches
from autodeploy.transforms.interface import BaseTransform, TransformInfo, register
from autodeploy.sharding.layout import LayoutError, Part, local_ranges, split_layout

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


def _plan(model: str, world: int, *overrides: str):
    cfg = compose_experiment([f"model={model}", f"args.world_size={world}", *overrides])
    built = plan_sharding(experiment(cfg).args, world)
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
    assert "model.layers.*.self_attn: not split column/row (the closing linear linear_* would sum replicated pieces: " \
        "4 units of 16 (heads) on 8 ranks); its linears are gathered where their outputs divide by 8, else kept " \
        "whole (2 times)" in caplog.text


def _user_error(excinfo) -> str:
    error = find_user_error(excinfo.value)
    assert error is not None, f"not a UserError: {excinfo.value!r}"
    return str(error)


def test_a_plan_that_splits_nothing_is_refused_unless_asked_for(caplog):
    # 3 ranks divide nothing of tiny_llama (4 heads, 2 KV heads, 128 MLP units, 512 vocab)
    with caplog.at_level(logging.INFO, logger="autodeploy.sharding"), pytest.raises(Exception) as excinfo:
        _plan("tiny_llama", 3, "args.device=cpu")
    message = _user_error(excinfo)
    assert "\n" not in message
    assert message.startswith("sharding: the plan for world_size 3 splits nothing, so every rank would hold and run the "
                              "whole model (sharding factory config rejected for model.layers.*.self_attn (q_proj, "
                              "k_proj, v_proj, o_proj): 4 units of 16 cannot be split evenly among 3 ranks (2 times))")
    assert message.endswith("or ask for whole replicas on purpose with sharding=replicate")
    # the plan and its summary line are shown before the refusal
    assert "0 layers split, 0 linears gathered, 15 kept whole on every rank; 0 collectives per forward" in caplog.text
    # asked for: every linear kept whole by the manual plan
    plan, rows = _plan("tiny_llama", 3, "args.device=cpu", "sharding=replicate")
    assert plan.replicated_on_purpose and plan.splits_nothing()
    assert {(r.strategy, r.source) for r in rows.values()} == {("replicate", "manual")}
    # a replicate entry that leaves other linears whole by fallback is not a request for replicas
    with pytest.raises(Exception) as excinfo:
        _plan("tiny_llama", 3, "args.device=cpu", "++args.transforms.detect_sharding.manual_config={tp_plan: {lm_head: replicate}}")
    assert "splits nothing" in _user_error(excinfo)


NINE_HEADS = ("args.device=cpu", "args.skip_loading_weights=true", "++args.model_kwargs={num_attention_heads: 9, "
              "num_key_value_heads: 3, hidden_size: 144, head_dim: 16, num_hidden_layers: 6}")


def test_repeated_reasons_are_one_line_and_the_plan_ends_with_a_summary(caplog):
    """9 heads at world_size 2 (SmolLM's shape): the reason is said once for the 6 layers, not once per layer."""
    with caplog.at_level(logging.INFO, logger="autodeploy.sharding"):
        plan, rows = _plan("tiny_llama", 2, *NINE_HEADS)
    messages = [r.getMessage() for r in caplog.records if r.name == "autodeploy.sharding"]
    rejected = [m for m in messages if "9 units of 16 cannot be split evenly among 2 ranks" in m]
    assert rejected == ["sharding factory config rejected for model.layers.*.self_attn (q_proj, k_proj, v_proj, o_proj): "
                        "9 units of 16 cannot be split evenly among 2 ranks (6 times)",
                        "model.layers.*.self_attn: not split column/row (9 units of 16 cannot be split evenly among 2 "
                        "ranks); its linears are gathered where their outputs divide by 2, else kept whole (6 times)"]
    table = messages[-1].splitlines()
    assert table[0] == "sharding plan for world_size 2:"
    # 6 MLPs split; 4 attention linears x 6 layers + lm_head gathered (9*16 = 144 and 3*16 = 48 divide by 2)
    assert table[-1].startswith("6 layers split (6 column/row), 25 linears gathered, 0 kept whole on every rank; "
                                "31 collectives per forward")
    assert plan.counts() == {"split": 6, "gathered": 25, "replicated": 0} == \
        {k: plan.summary()[k] for k in ("split", "gathered", "replicated")}
    assert rows["model.layers.5.self_attn.q_proj"].strategy == "gather"


def test_plan_only_refuses_a_plan_that_splits_nothing_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "launch.py", "model=tiny_llama", "args.world_size=3", "plan_only=true",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "the plan for world_size 3 splits nothing" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    out = proc.stdout + proc.stderr
    assert "sharding plan for world_size 3:" in out and "15 kept whole on every rank" in out


def test_dry_run_shows_the_grid_and_an_invalid_one():
    def dry(*overrides):
        proc = subprocess.run([sys.executable, "launch.py", "model=tiny_mixtral", "args.world_size=4", "--dry-run",
                               *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split("# sharding (world_size 4)\n", 1)[1]

    text = dry("sharding=ep_tp_grid")
    assert "MoE layers: ep 2 x tp 2, experts divided among 2 rank groups (0,1 | 2,3), each expert split over the 2 " \
           "ranks of its group" in text
    assert "plan_only=true prints it" in text and "sharding=replicate" in text
    text = dry("sharding=ep", "++args.transforms.detect_sharding.process_grid={ep: 3, tp: 2}")
    assert "process_grid {'ep': 3, 'tp': 2}: ep (3) x tp (2) != world_size (4); MoE layers use 1-D expert " \
           "parallelism over 4 ranks instead. MoE layers: ep 4 x tp 1, experts divided among 4 rank groups " \
           "(0 | 1 | 2 | 3)" in text


def test_the_grid_shows_in_the_plan_rows_and_summary():
    """{ep: 4}, {ep: 2, tp: 2} and {tp: 2, ep: 2} hold the same bytes per rank; the plan tells them apart."""
    seen = {}
    for grid in ("{ep: 4}", "{ep: 2, tp: 2}", "{tp: 2, ep: 2}"):
        plan, rows = _plan("tiny_mixtral", 4, "args.device=cpu", "sharding=ep",
                           f"++args.transforms.detect_sharding.process_grid={grid}")
        summary = plan.summary()
        seen[grid] = (rows["model.layers.1.mlp.experts"].ranks, summary["experts_per_rank_max"], summary["moe"],
                      summary["bytes_per_rank_max"])
    assert seen["{ep: 4}"][:2] == ("ep 4 x tp 1, experts 0: rank 0 | 1: rank 1 | 2: rank 2 | 3: rank 3", 1)
    assert seen["{ep: 2, tp: 2}"][:2] == ("ep 2 x tp 2, experts 0-1: ranks 0,1 | 2-3: ranks 2,3", 2)
    assert seen["{tp: 2, ep: 2}"][:2] == ("ep 2 x tp 2, experts 0-1: ranks 0,2 | 2-3: ranks 1,3", 2)
    assert seen["{ep: 2, tp: 2}"][2] == [{"layers": 2, "ep": 2, "tp": 2, "experts": 4, "experts_per_rank": 2,
                                          "expert_groups": [{"experts": [0, 2], "ranks": [0, 1]},
                                                            {"experts": [2, 4], "ranks": [2, 3]}]}]
    assert len({v[3] for v in seen.values()}) == 1  # the same bytes per rank: that column alone cannot tell
    assert "ranks" in format_table(plan.rows()).splitlines()[0]


def test_comm_bytes_per_token_from_the_collectives():
    plan, _ = _plan("tiny_llama", 2, "args.device=cpu", "args.transforms.detect_sharding.sharding_source=[heuristic]")
    summary = plan.summary()
    # 4 all-reduces of a 64-float row (2 ranks: each sends 2 * 1/2 of it) + lm_head's all-gather of 512 floats (1/2)
    assert summary["comm_bytes_per_token"] == 4 * 64 * 4 + 512 * 4 // 2
    assert summary["collectives_per_forward"] == 5 and summary["experts_per_rank_max"] is None and summary["moe"] == []


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
    assert {"target", "strategy", "source", "dim", "bytes_per_rank", "ranks"} == set(results["sharding_plan"][0])
    assert results["sharding_summary"]["split"] == 2 * 80 and "moe" in results["sharding_summary"]
    assert "at most 18.1 GiB per rank" in proc.stdout  # human units (units.human_bytes)


# ----- manual_config: patterns, head_dim, single-linear strategies, the hybrid preset ------------------


@pytest.mark.parametrize("pattern,module,hit", [
    ("up_proj", "model.layers.0.mlp.up_proj", True),
    ("up_proj", "model.layers.0.mlp.gate_up_proj", False),  # a substring rule matched this
    ("*up_proj", "model.layers.0.mlp.gate_up_proj", True),
    ("layers.*.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),  # HF base_model_tp_plan keys
    ("layers.*.q_proj", "model.layers.0.self_attn.q_proj", False),  # one * is one component
    ("model.layers.*.mlp.*_proj", "model.layers.3.mlp.down_proj", True),
    ("model.layers.*.mlp.*_proj", "model.layers.3.self_attn.o_proj", False),
    ("*", "lm_head", True),
    ("*", "model.layers.0.mlp.up_proj", True),  # the last component
    ("mlp", "model.layers.0.mlp.up_proj", False),  # a prefix names no module
    ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj", True),
    ("x.model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj", False),
    ("layers.1*.mlp.up_proj", "model.layers.12.mlp.up_proj", True),
    ("layers.1*.mlp.up_proj", "model.layers.2.mlp.up_proj", False),
])
def test_tp_plan_patterns_match_the_last_path_components(pattern, module, hit):
    assert pattern_matches(pattern, module) is hit


def _tp_plan_file(tmp_path, tp_plan: dict) -> str:
    """A yaml_extra override with this tp_plan (keys with ``*`` cannot be written on Hydra's command line)."""
    path = tmp_path / f"tp_plan_{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump({"args": {"transforms": {"detect_sharding": {"manual_config": {"tp_plan": tp_plan}}}}}))
    return f"yaml_extra=[{path}]"


def test_a_pattern_over_linears_of_different_kinds_warns(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="autodeploy.sharding"):
        _plan("tiny_llama", 2, "args.device=cpu", _tp_plan_file(tmp_path, {"*_proj": "colwise"}))
    assert "pattern '*_proj' (colwise) matches linears of different kinds: opening (model.layers.*.self_attn.q_proj, " \
           "...), closing (model.layers.*.self_attn.o_proj, ...); one strategy rarely suits both" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autodeploy.sharding"):  # gather suits any linear: no warning
        _, rows = _plan("tiny_llama", 2, "args.device=cpu", _tp_plan_file(tmp_path, {"*_proj": "gather"}))
    assert "different kinds" not in caplog.text
    assert rows["model.layers.0.self_attn.o_proj"].strategy == "gather" and rows["model.layers.0.self_attn.o_proj"].source == "manual"


def test_configured_head_dim_is_checked_against_the_graph(caplog):
    # head_dim 32 on 16-wide heads: the layer used to be rejected deep in the region walk ("rank 0's query heads
    # 0..1 do not line up with its KV heads"); now the cause is named, both sizes
    manual = MANUAL_ATTENTION.replace("head_dim: 16", "head_dim: 32")
    with caplog.at_level(logging.WARNING, logger="autodeploy.sharding"):
        _, rows = _plan("tiny_llama", 2, "args.device=cpu", manual)
    assert "sharding manual config rejected for model.layers.*.self_attn (q_proj, k_proj, v_proj, o_proj): " \
           "manual_config.head_dim is 32 but the graph's attention heads are 16 wide; set it to 16 or leave it out " \
           "(2 times)" in caplog.text
    assert rows["model.layers.0.self_attn.q_proj"].source == "factory"
    _, rows = _plan("tiny_llama", 2, "args.device=cpu", MANUAL_ATTENTION)  # head_dim 16: the manual plan is used
    assert rows["model.layers.0.self_attn.q_proj"].source == "manual"


SEED_OVERRIDES = ROOT / "tests" / "config" / "seed_files" / "autodeploy_overrides.yaml"


def test_the_seeds_manual_plan_on_tiny_hybrid(caplog):
    """The seed's own manual_config (head_dim 128, Nemotron-H's names) on tiny_hybrid (heads of 16, no gate_proj,
    no latent MoE): the Mamba and MLP layers are the manual plan's; the attention layer is rejected, and why."""
    with caplog.at_level(logging.WARNING, logger="autodeploy.sharding"):
        _, rows = _plan("tiny_hybrid", 2, "args.device=cpu", "args.skip_loading_weights=true",
                        f"args.yaml_extra=[{SEED_OVERRIDES}]")
    for target, strategy in [("layers.0.mixer.in_proj", "mamba"), ("layers.3.mixer.out_proj", "rowwise"),
                             ("layers.2.mixer.up_proj", "colwise"), ("layers.2.mixer.down_proj", "rowwise")]:
        assert (rows[f"model.{target}"].strategy, rows[f"model.{target}"].source) == (strategy, "manual")
    assert rows["model.layers.1.mixer.q_proj"].source != "manual"
    assert "manual_config.head_dim is 128 but the graph's attention heads are 16 wide" in caplog.text
    assert "reshapes the split axis" not in caplog.text  # the cryptic fallback the mismatch used to give
    for key in ("gate_proj", "fc1_latent_proj", "fc2_latent_proj"):
        assert f"pattern '{key}' matches no linear layer" in caplog.text


def test_the_hybrid_manual_preset_matches_tiny_hybrid(caplog):
    with caplog.at_level(logging.WARNING, logger="autodeploy.sharding"):
        plan, rows = _plan("tiny_hybrid", 2, "args.device=cpu", "sharding=hybrid_manual")
    assert not [r.getMessage() for r in caplog.records if r.name == "autodeploy.sharding"]
    layers = {t: r for t, r in rows.items() if t.startswith("model.layers.")}
    assert {r.source for r in layers.values()} == {"manual"}
    assert {t.rpartition(".")[2] for t in layers} >= {"in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                                                      "up_proj", "down_proj"}
    assert plan.counts() == {"split": 4, "gathered": 1, "replicated": 0}  # lm_head: the heuristic's


def test_manual_gather_and_replicate_entries():
    plan, rows = _plan("tiny_llama", 2, "args.device=cpu",
                       f"yaml_extra=[{Path(__file__).parent / 'manual_gather_replicate.yaml'}]")
    assert (rows["lm_head"].strategy, rows["lm_head"].source) == ("replicate", "manual")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert (rows[f"model.layers.1.mlp.{proj}"].strategy, rows[f"model.layers.1.mlp.{proj}"].source) == ("gather", "manual")
    assert rows["model.layers.1.self_attn.o_proj"].source == "factory"
    summary = plan.summary()
    assert (summary["all_gather_per_forward"], summary["all_reduce_per_forward"]) == (3 * 2, 2)


def test_requires_shape_prop_is_the_optimizers_flag():
    """requires_shape_prop (every transform has it): shapes are propagated before detect_sharding when an
    earlier transform left them stale; without it the plan stops, naming a node without a shape."""
    from hf_zoo import PATTERN_PIPELINE, FakeFactory, build_hf_model, export

    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    hf = build_hf_model("llama")
    gm = InferenceOptimizer(PATTERN_PIPELINE)(BuildContext(factory=FakeFactory(hf.config)), export(hf))

    def plan(requires_shape_prop: bool):
        pipeline = {"_test_forget_shapes": {"stage": "pattern_matcher"},
                    "detect_sharding": {"stage": "sharding", "requires_shape_prop": requires_shape_prop}}
        ctx = BuildContext(factory=FakeFactory(hf.config), world_size=2)
        InferenceOptimizer(pipeline)(ctx, copy.deepcopy(gm))
        return ctx.shared["sharding_plan"]

    rows = {r.target: r for r in plan(True).rows()}
    assert rows["model.layers.0.self_attn.q_proj"].strategy == "colwise"
    with pytest.raises(Exception, match=r"detect_sharding needs every node's shape, and \w+ has none: an earlier "
                                        r"transform left the shapes stale and requires_shape_prop is false"):
        plan(False)


@register("_test_forget_shapes")
class _ForgetShapes(BaseTransform):
    """A transform that changes the graph and leaves its shapes stale (as a rewrite without fake values would)."""

    graph_only = True

    def apply(self, model, ctx):
        for n in model.graph.nodes:
            if n.op == "call_function":  # the inputs keep theirs: propagation starts from them
                n.meta.pop("val", None)
        return model, TransformInfo(num_matches=1, is_clean=True, has_valid_shapes=False)
