"""Sharded graphs on real gloo ranks equal HF eager: tiny models through the real loader, every
``hf_zoo`` architecture, each sharding source and dim; per-rank sizes and a negative control.

All cases of one world size run in one spawn (a session fixture), so CI pays the start-up once;
a case that fails there fails its own tests only (``rank_cases``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_zoo import VARIANTS
from rank_cases import SHAPES, Case, CaseResults, run_cases

WILDCARD_PLAN = (f"yaml_extra=[{Path(__file__).parent / 'manual_tp_plan.yaml'}]",)
GATHER_REPLICATE = (f"yaml_extra=[{Path(__file__).parent / 'manual_gather_replicate.yaml'}]",)
HEURISTIC = ("args.transforms.detect_sharding.sharding_source=[heuristic]",)
SSM = ("args.transforms.detect_sharding.sharding_dims=[tp,ep,bmm,ssm]",)
BMM_ONLY = (*HEURISTIC, "args.transforms.detect_sharding.sharding_dims=[bmm]")

# Falcon's linears are matmuls with a transposed weight (FalconLinear), not aten.linear: the sharder
# finds nothing it can split, and a plan that splits nothing must be asked for (sharding=replicate)
STAYS_WHOLE = {"zoo_falcon", "zoo_falcon_new_arch"}

# every architecture of tests/transforms (hf_zoo), at world_size 2
ZOO = list(VARIANTS)

CASES_2 = [
    Case("llama_heuristic", "tiny_llama", HEURISTIC),
    Case("llama_factory", "tiny_llama", ("args.transforms.detect_sharding.sharding_source=[factory]",)),
    Case("llama_manual", "tiny_llama", WILDCARD_PLAN),
    Case("llama_simple", "tiny_llama", ("sharding=simple",)),
    Case("mixtral_ep", "tiny_mixtral", ("sharding=ep",)),
    Case("hybrid_ssm", "tiny_hybrid", SSM),
    Case("mixtral_tp", "tiny_mixtral", ("sharding=tp",)),  # every preset of conf/sharding runs for real
    Case("hybrid_manual", "tiny_hybrid", ("sharding=hybrid_manual",)),
    Case("llama_gather_replicate", "tiny_llama", GATHER_REPLICATE),  # manual single-linear strategies
    Case("llama4_bmm", "zoo:llama4_text", BMM_ONLY),  # its experts as batched matmuls, split alone
] + [Case(f"zoo_{name}", f"zoo:{name}", ("sharding=replicate",) if f"zoo_{name}" in STAYS_WHOLE else ())
     for name in ZOO]

CASES_4 = [
    Case("llama_heuristic", "tiny_llama", HEURISTIC),
    Case("llama_default", "tiny_llama", ()),
    Case("llama_manual", "tiny_llama", WILDCARD_PLAN),
    Case("llama_simple", "tiny_llama", ("sharding=simple",)),
    Case("mixtral_ep", "tiny_mixtral", ("sharding=ep",)),
    Case("mixtral_ep_tp", "tiny_mixtral", ("sharding=ep_tp_grid",)),
    Case("hybrid_ssm", "tiny_hybrid", SSM),
]


# 8 CPU ranks (what the 8-GPU runs would use, on tiny models): 4 query heads cannot split over 8
# ranks (simple shard), the MLP can; Mixtral's 4 experts over a {ep: 4, tp: 2} grid
CASES_8 = [
    Case("llama_default", "tiny_llama", ()),
    Case("mixtral_ep4_tp2", "tiny_mixtral", ("sharding=ep", "++args.transforms.detect_sharding.process_grid={ep: 4, tp: 2}")),
]


@pytest.fixture(scope="session")
def world8():
    return CaseResults(run_cases(8, CASES_8), 8)


@pytest.fixture(scope="session")
def world2():
    return CaseResults(run_cases(2, CASES_2), 2)


@pytest.fixture(scope="session")
def world4():
    return CaseResults(run_cases(4, CASES_4), 4)


def _results(request, world):
    return request.getfixturevalue(f"world{world}")



ALL_CASES = [(2, c.id) for c in CASES_2] + [(4, c.id) for c in CASES_4] + [(8, c.id) for c in CASES_8]


@pytest.mark.parametrize("world,case", ALL_CASES)
def test_logits_equal_hf_eager(request, world, case):
    r = _results(request, world)[case]
    for (batch, seq), got, ref in zip(SHAPES, r["logits"], r["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"{case} at world {world}, shape {batch}x{seq}")
    if case in STAYS_WHOLE:
        assert not r["collectives"] and {row["strategy"] for row in r["rows"]} <= {"replicate"}
    else:
        assert r["collectives"], "a sharded graph must hold collectives"


@pytest.mark.parametrize("world,case", [c for c in ALL_CASES if c[1] not in STAYS_WHOLE])
def test_without_collectives_the_output_is_wrong(request, world, case):
    r = _results(request, world)[case]
    broken = r["without_collectives"]
    if isinstance(broken, torch.Tensor):
        reference = r["reference"][SHAPES.index((2, 7))]
        assert not torch.allclose(broken, reference, rtol=1e-3, atol=1e-3), "removing the collectives changed nothing"
    else:
        assert "Error" in broken


def _linear_params(cfg_layers, hidden, heads, kv, head_dim, inter):
    return cfg_layers * (hidden * heads * head_dim * 2 + 2 * hidden * kv * head_dim + 3 * hidden * inter)


# tiny_llama (autodeploy/models/tiny.py): hidden 64, 4 heads of 16, 2 KV heads, intermediate 128, 2 layers,
# vocab 512; 2*2+1 norms of 64; untied embedding and lm_head
LLAMA = dict(layers=2, hidden=64, heads=4, kv=2, head_dim=16, inter=128, vocab=512)


def _llama_expected(world: int, simple: bool = False, lm_head_split: bool = True) -> int:
    c = LLAMA
    norms = (2 * c["layers"] + 1) * c["hidden"]
    embed, lm_head = c["vocab"] * c["hidden"], c["vocab"] * c["hidden"]
    q = o = c["hidden"] * c["heads"] * c["head_dim"]
    kv = c["hidden"] * c["kv"] * c["head_dim"]
    mlp = 3 * c["hidden"] * c["inter"]
    kv_split = world if simple else min(world, c["kv"])  # KV heads are replicated, not split below a head
    per_layer = (q + o + mlp) / world + 2 * kv / kv_split
    return int(norms + embed + lm_head / (world if lm_head_split else 1) + c["layers"] * per_layer)


# the heuristic simple-shards lm_head (a leftover); a plan from the manual or factory source alone leaves it whole
LLAMA_CASES = [(2, "llama_heuristic", True), (2, "llama_factory", False), (2, "llama_manual", False),
               (2, "llama_simple", True), (2, "llama_gather_replicate", False),  # lm_head: replicate
               (4, "llama_heuristic", True), (4, "llama_default", True),
               (4, "llama_manual", False), (4, "llama_simple", True)]


@pytest.mark.parametrize("world,case,lm_head_split", LLAMA_CASES)
def test_llama_params_per_rank(request, world, case, lm_head_split):
    r = _results(request, world)[case]
    expected = _llama_expected(world, simple=case == "llama_simple", lm_head_split=lm_head_split)
    assert r["param_counts"] == [expected] * world


# tiny_mixtral: 4 experts (gate_up [4, 192, 64], down [4, 64, 96]) per layer, router [4, 64]
def _mixtral_expected(world: int, ep: int, tp: int) -> int:
    hidden, layers, experts, inter, vocab = 64, 2, 4, 96, 512
    # 4 query heads: split by heads up to 4 ranks (KV heads replicated), simple-sharded beyond
    attn = hidden * 4 * 16 * 2 / world + 2 * hidden * 2 * 16 / (world if world > 4 else min(world, 2))
    expert_params = experts * 3 * hidden * inter / (ep * tp)
    router = experts * hidden
    norms = (2 * layers + 1) * hidden
    return int(norms + vocab * hidden + vocab * hidden / world + layers * (attn + expert_params + router))


@pytest.mark.parametrize("world,case,ep,tp", [(2, "mixtral_ep", 2, 1), (4, "mixtral_ep", 4, 1), (4, "mixtral_ep_tp", 2, 2),
                                              (8, "mixtral_ep4_tp2", 4, 2)])
def test_mixtral_params_per_rank(request, world, case, ep, tp):
    r = _results(request, world)[case]
    assert r["param_counts"] == [_mixtral_expected(world, ep, tp)] * world
    experts = [row for row in r["rows"] if row["target"].endswith("mlp.experts")]
    assert experts and {row["strategy"] for row in experts} == {"ep"} and {row["dim"] for row in experts} == {"ep"}


def test_plan_rows_name_sources_and_strategies(world2, world4):
    llama = world2["llama_factory"]["rows"]
    by_target = {r["target"]: r for r in llama}
    assert by_target["model.layers.0.self_attn.q_proj"]["strategy"] == "colwise"
    assert by_target["model.layers.0.self_attn.q_proj"]["source"] == "factory"
    assert by_target["model.layers.1.mlp.down_proj"]["strategy"] == "rowwise"
    assert by_target["lm_head"]["strategy"] == "replicate"  # the factory plan has no lm_head; no heuristic here
    lm_head = {r["target"]: r for r in world2["llama_heuristic"]["rows"]}["lm_head"]
    assert lm_head == {"target": "lm_head", "strategy": "gather", "source": "heuristic", "dim": "tp",
                       "bytes_per_rank": 512 * 64 * 4 // 2, "ranks": ""}
    assert {r["source"] for r in world2["llama_manual"]["rows"] if "layers" in r["target"]} == {"manual"}
    assert {r["strategy"] for r in world2["llama_simple"]["rows"]} == {"gather"}
    hybrid = {r["target"]: r for r in world2["hybrid_ssm"]["rows"]}
    assert hybrid["model.layers.0.mixer.in_proj"]["strategy"] == "mamba"
    assert hybrid["model.layers.0.mixer.in_proj"]["dim"] == "ssm"
    assert hybrid["model.layers.0.mixer.out_proj"]["strategy"] == "rowwise"
    # 2 Mamba groups cannot be split over 4 ranks: the mixer is simple-sharded instead (still exact)
    hybrid4 = {r["target"]: r for r in world4["hybrid_ssm"]["rows"]}
    assert hybrid4["model.layers.0.mixer.in_proj"]["strategy"] == "gather"
    manual = {r["target"]: r for r in world2["hybrid_manual"]["rows"]}
    assert (manual["model.layers.0.mixer.in_proj"].get("strategy"), manual["model.layers.0.mixer.in_proj"]["source"]) \
        == ("mamba", "manual")
    assert manual["model.layers.2.mixer.up_proj"]["source"] == "manual"
    # sharding=tp: experts split by their intermediate dim over all ranks, not distributed
    tp_experts = {r["target"]: r for r in world2["mixtral_tp"]["rows"]}["model.layers.0.mlp.experts"]
    assert (tp_experts["strategy"], tp_experts["dim"]) == ("colwise", "tp")
    summary = world2["llama_heuristic"]["summary"]
    assert summary["world_size"] == 2 and summary["collectives_per_forward"] == 2 * 2 + 1
    assert summary["all_gather_per_forward"] == 1 and world2["llama_factory"]["summary"]["all_gather_per_forward"] == 0


def test_manual_gather_and_replicate_run_as_planned(world2):
    r = world2["llama_gather_replicate"]
    rows = {row["target"]: row for row in r["rows"]}
    assert (rows["lm_head"]["strategy"], rows["lm_head"]["source"]) == ("replicate", "manual")
    assert {(rows[f"model.layers.{i}.mlp.{p}"]["strategy"], rows[f"model.layers.{i}.mlp.{p}"]["source"])
            for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")} == {("gather", "manual")}
    # 3 gathered MLP linears per layer; attention (factory, column/row) one all-reduce per layer; lm_head whole
    assert sorted(r["collectives"]) == ["autodeploy.all_gather.default"] * 6 + ["autodeploy.all_reduce.default"] * 2


def test_batched_matmul_experts_are_split(world2):
    """llama4_text's experts stay graph code: two bmm with [E, ...] parameters, split along E (bmm only here)."""
    r = world2["llama4_bmm"]
    bmm = sorted(row["target"] for row in r["rows"] if row["strategy"] == "bmm")
    assert bmm == [f"model.layers.{i}.feed_forward.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    assert {row["strategy"] for row in r["rows"]} <= {"bmm", "replicate"}
    assert r["collectives"] == ["autodeploy.all_gather.default"] * 4
    assert r["summary"]["split"] == 4 and r["summary"]["gathered"] == 0
    zoo = {row["target"]: row["strategy"] for row in world2["zoo_llama4_text"]["rows"]}  # the default dims too
    assert zoo["model.layers.1.feed_forward.experts.gate_up_proj"] == "bmm"


# tiny_hybrid (autodeploy/models/tiny.py): hidden 64, vocab 512, untied lm_head; layers: Mamba2, attention, MLP,
# Mamba2; Mamba2: 8 heads of 16 in 2 groups, state 16, conv kernel 4 with bias; attention 4 heads of 16, 2 KV
# heads; MLP up/down 128 (relu2); one norm per layer and a final one
HYBRID = dict(hidden=64, vocab=512, heads=8, head_dim=16, groups=2, state=16, kernel=4, attn_heads=4, kv=2, inter=128)


def _hybrid_expected(world: int) -> int:
    c = HYBRID
    inner, bc = c["heads"] * c["head_dim"], 2 * c["groups"] * c["state"]
    in_proj = (2 * inner + bc + c["heads"]) * c["hidden"]  # [z | x | B | C | dt]
    conv = (inner + bc) * (c["kernel"] + 1)  # depthwise weight + bias over [x | B | C]
    per_head = 3 * c["heads"]  # A_log, D, dt_bias
    norm, out_proj = inner, c["hidden"] * inner
    q = o = c["hidden"] * c["attn_heads"] * c["head_dim"]
    kv = c["hidden"] * c["kv"] * c["head_dim"]
    mlp = 2 * c["hidden"] * c["inter"]
    whole = c["vocab"] * c["hidden"] + 5 * c["hidden"]  # embedding, 4 layer norms and the final norm
    if c["groups"] % world == 0:  # the Mamba mixer splits by groups: every one of its parameters
        mamba = (in_proj + conv + per_head + norm + out_proj) / world
    else:  # fewer groups than ranks: its linears are gathered, the rest stays whole
        mamba = (in_proj + out_proj) / world + conv + per_head + norm
    attention = (q + o) / world + 2 * kv / min(world, c["kv"])  # KV heads replicated below one per rank
    return int(whole + 2 * mamba + attention + mlp / world + c["vocab"] * c["hidden"] / world)


@pytest.mark.parametrize("world,case", [(2, "hybrid_ssm"), (2, "hybrid_manual"), (4, "hybrid_ssm")])
def test_hybrid_params_per_rank(request, world, case):
    assert _results(request, world)[case]["param_counts"] == [_hybrid_expected(world)] * world


# What stays whole in each hf_zoo model at world_size 2 (beyond embeddings and norms), and why; every other
# parameter is split in two. The sizes come from the HF model's own parameters.
ZOO_WHOLE = {
    "mixtral": r"mlp\.gate\.",  # the router: every rank needs all the scores
    "qwen3_moe": r"mlp\.gate\.",
    "qwen2_moe": r"mlp\.gate\.|shared_expert_gate\.",  # the router; the shared expert's gate has one output
    "gemma2": r"^lm_head\.",  # tied to the embedding
    "lfm2": r"^lm_head\.|conv\.conv\.",  # tied; the short conv's weight (its layer is gathered, not split)
    "falcon": ".", "falcon_new_arch": ".",  # sharding=replicate (STAYS_WHOLE)
    "apertus": r"act_fn\.",  # xIELU's scalars
    "dbrx": r"router\.|experts\.mlp\.",  # its experts reach the MoE op through views of 2-D weights: kept whole
    # Mamba1 layers are gathered (ssm splits Mamba2 scans only); dt_proj is a matmul, not a linear
    "jamba": r"router\.|mamba\.(A_log|D|conv1d|dt_proj)(\.|$)",
    "falcon_h1": r"mamba\.(dt_bias|A_log|D|conv1d)(\.|$)",  # ssm is not in the default dims: in/out_proj gathered
    "zamba2": r"^lm_head\.|mamba\.(dt_bias|A_log|D|conv1d|norm)(\.|$)|shared_transformer\.(self_attn\.[qkvo]_proj|"
              r"feed_forward\.(gate_up|down)_proj)\.",  # tied; Mamba2 gathered; the shared block's weights are read twice
    "gpt_oss": r"sinks|experts\.",  # attention is gathered (sinks whole); the experts stay graph code no dim claims
}
ZOO_RANK_0_ONLY = {"bloom": r"dense_4h_to_h\.bias"}  # a row-split closing linear's bias: added once, by rank 0


def _zoo_expected(name: str, world: int, only: str | None = None) -> list[int]:
    """Per-rank parameter counts: ``only`` given, just the parameters it matches are split."""
    import re

    from hf_zoo import build_hf_model

    whole = split = rank0 = 0
    for fqn, p in build_hf_model(name).named_parameters():  # tied weights once
        module = fqn.rsplit(".", 2)[-2] if fqn.count(".") else ""
        if only is not None:
            kept = not re.search(only, fqn)
        else:
            kept = "norm" in module or module.startswith("ln_") or module in ("embed_tokens", "wte", "word_embeddings") \
                or bool(re.search(ZOO_WHOLE.get(name, "^$"), fqn))
        if only is None and re.search(ZOO_RANK_0_ONLY.get(name, "^$"), fqn):
            rank0 += p.numel()
        elif kept:
            whole += p.numel()
        else:
            split += p.numel()
    assert split % world == 0
    return [whole + split // world + (rank0 if r == 0 else 0) for r in range(world)]


@pytest.mark.parametrize("case", [c.id for c in CASES_2 if c.model.startswith("zoo:")])
def test_zoo_params_per_rank(world2, case):
    name = next(c.model[4:] for c in CASES_2 if c.id == case)
    only = r"experts\.(gate_up|down)_proj$" if case == "llama4_bmm" else None  # bmm alone: the experts only
    assert world2[case]["param_counts"] == _zoo_expected(name, 2, only)


def test_eight_ranks_split_what_divides(world8):
    rows = {r["target"]: r for r in world8["llama_default"]["rows"]}
    assert rows["model.layers.0.self_attn.q_proj"]["strategy"] == "gather"  # 4 heads, 8 ranks
    assert rows["model.layers.0.mlp.down_proj"]["strategy"] == "rowwise"  # 128 / 8


def test_a_failing_case_fails_alone():
    # one spawn, two cases: tiny_hybrid's export breaks on every rank (its scan helper is not what the export
    # patch reproduces); tiny_llama's case in the same spawn still runs and matches HF
    results = CaseResults(run_cases(2, [Case("hybrid_broken", "tiny_hybrid", SSM, setup="ssm_scan_of_another_signature"),
                                        Case("llama_after_it", "tiny_llama", HEURISTIC)]), 2)
    error = results.results["hybrid_broken"]["error"]
    assert "rank 0: " in error and "rank 1: " in error
    assert "ssm_helper_ops cannot export nemotron_h" in error and "mamba2_chunk_scan" in error, error
    with pytest.raises(pytest.fail.Exception, match="hybrid_broken at world 2 failed"):
        results["hybrid_broken"]
    llama = results["llama_after_it"]
    for got, ref in zip(llama["logits"], llama["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert llama["collectives"]
