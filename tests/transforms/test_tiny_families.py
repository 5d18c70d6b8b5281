"""The built-in pipeline up to weight_load on each tiny family: logits equal HF eager, right counts.

This runs the real default.yaml (not a hand-picked list) through the InferenceOptimizer, so it
checks the pipeline a user gets, before the cache and compile stages change the graph's inputs.
"""

import copy
from collections import Counter

import pytest
import torch


from autodeploy.config import compose_experiment, experiment
from autodeploy.models.factory import create_factory
from autodeploy.transforms.interface import BuildContext, Stage
from autodeploy.transforms.optimizer import InferenceOptimizer

SHAPES = [(1, 1), (2, 7), (3, 16), (1, 33)]


def _uncached_pipeline(cfg):
    transforms = copy.deepcopy(cfg.args.transforms)
    return {k: v for k, v in transforms.items() if Stage.parse(v["stage"]) <= Stage.WEIGHT_LOAD}


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_mixtral", "tiny_hybrid"])
def family(request):
    cfg = experiment(compose_experiment([f"model={request.param}", "args.device=cpu", "args.dtype=float32"], check_transforms=False))
    factory = create_factory(cfg.args)
    optimizer = InferenceOptimizer(_uncached_pipeline(cfg))
    gm = optimizer(BuildContext(args=cfg.args, factory=factory))
    hf = factory.build_model("cpu")
    factory.load_weights(hf, "cpu")
    return request.param, factory, gm, hf, optimizer.report


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_transformed_graph_equals_hf_eager(family, batch, seq):
    _, factory, gm, hf, _ = family
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, factory.config.vocab_size, (batch, seq), generator=gen)
    pos = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        ours = gm(ids, pos)
        ref = hf(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# (attention, rope, rms_norm, moe, causal_conv1d, ssm_scan) per family; see the layer layouts in
# autodeploy/models/tiny.py: 2 Llama layers; 2 Mixtral layers; NemotronH [mamba, attention, mlp,
# mamba] whose attention has no RoPE and whose 4 blocks + final norm are RMSNorms
EXPECTED = {
    "tiny_llama": (2, 2, 2 * 2 + 1, 0, 0, 0),
    "tiny_mixtral": (2, 2, 2 * 2 + 1, 2, 0, 0),
    "tiny_hybrid": (1, 0, 4 + 1, 0, 2, 2),
}


def test_canonical_op_counts(family):
    name, factory, gm, _, report = family
    counts = Counter(n.target.name().split("::")[1].split(".")[0] for n in gm.graph.nodes
                     if n.op == "call_function" and hasattr(n.target, "name") and n.target.name().startswith("autodeploy::"))
    got = tuple(counts[k] for k in ("attention", "rope", "rms_norm", "moe", "causal_conv1d", "ssm_scan"))
    assert got == EXPECTED[name]
    # HF's eager pieces are gone: no SDPA, no repeat_kv expand feeding attention
    assert not any("scaled_dot_product_attention" in str(n.target) or "autodeploy.sdpa" in str(n.target)
                   for n in gm.graph.nodes)
    rows = {r.name: r for r in report}
    assert rows["match_attention_pattern"].num_matches == EXPECTED[name][0]
    assert rows["detect_sharding"].skipped and rows["build_model"].num_matches == 1


# ---- the same pipeline through post_load_fusion (the fusions of default.yaml)

# per family: fused add+norm pairs, fused linear groups, silu_mul. The hybrid: its attention's
# q/k/v (the Mamba in_proj is a single linear); its MLP is relu^2, no silu_mul
EXPECTED_FUSIONS = {"tiny_llama": (4, 4, 2), "tiny_mixtral": (4, 2, 0), "tiny_hybrid": (4, 1, 0)}


@pytest.fixture(scope="module")
def fused_family(family):
    """``family``'s graph (a copy) through the post_load_fusion transforms of default.yaml."""
    name, factory, gm, hf, _ = family
    cfg = experiment(compose_experiment([f"model={name}"], check_transforms=False))
    transforms = copy.deepcopy(cfg.args.transforms)
    fusions = {k: v for k, v in transforms.items() if Stage.parse(v["stage"]) == Stage.POST_LOAD_FUSION}
    optimizer = InferenceOptimizer(fusions)
    fused = optimizer(BuildContext(args=cfg.args, factory=factory), model=copy.deepcopy(gm))
    return name, factory, fused, hf, {r.name: r for r in optimizer.report}


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_fused_graph_equals_hf_eager_last_token(fused_family, batch, seq):
    _, factory, gm, hf, _ = fused_family
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, factory.config.vocab_size, (batch, seq), generator=gen)
    pos = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        ours = gm(ids, pos)
        ref = hf(input_ids=ids, position_ids=pos).logits[:, -1:]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_default_fusions_applied(fused_family):
    name, _, gm, _, report = fused_family
    counts = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    add_norms, groups, silu_muls = EXPECTED_FUSIONS[name]
    assert [report[k].num_matches for k in ("fuse_add_rms_norm", "fuse_parallel_linears", "fuse_silu_mul",
                                            "gather_last_token_logits")] == [add_norms, groups, silu_muls, 1]
    assert counts["autodeploy.fused_add_rms_norm.default"] == add_norms
    assert counts["autodeploy.rms_norm.default"] == 1  # the first norm reads the embedding: no add
    assert counts["autodeploy.silu_mul.default"] == silu_muls and counts["autodeploy.last_tokens.default"] == 1
