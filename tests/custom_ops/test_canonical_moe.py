"""``autodeploy::moe`` against transformers' grouped_mm experts (Mixtral layout)."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.moe  # noqa: F401

moe = torch.ops.autodeploy.moe.default


def mixtral_block(num_experts=4, top_k=2, hidden=32, inter=24, dtype=torch.float32):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                           num_experts_per_tok=top_k)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (8, 3)])
def test_matches_grouped_mm_experts(tokens, num_experts, top_k):
    block = mixtral_block(num_experts, top_k)
    x = torch.randn(tokens, 32)
    with torch.no_grad():
        _, weights, ids = block.gate(x)
        expected = block.experts(x, ids, weights)
    got = moe(x, ids, weights, block.experts.gate_up_proj.detach(), block.experts.down_proj.detach())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bf16_matches_grouped_mm_experts():
    block = mixtral_block(dtype=torch.bfloat16)
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        _, weights, ids = block.gate(x)
        expected = block.experts(x, ids, weights)
    got = moe(x, ids, weights, block.experts.gate_up_proj.detach(), block.experts.down_proj.detach())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)


def test_zero_routing_weight_drops_an_expert():
    block = mixtral_block()
    x = torch.randn(6, 32)
    ids = torch.tensor([[0, 1]] * 6)
    weights = torch.tensor([[1.0, 0.0]] * 6)
    only_first = moe(x, ids, weights, block.experts.gate_up_proj.detach(), block.experts.down_proj.detach())
    single = moe(x, ids[:, :1], weights[:, :1], block.experts.gate_up_proj.detach(), block.experts.down_proj.detach())
    torch.testing.assert_close(only_first, single, rtol=0, atol=1e-6)


def test_fake_kernel_and_registration():
    block = mixtral_block()
    x = torch.randn(7, 32)
    ids = torch.randint(0, 4, (7, 2))
    torch.library.opcheck(moe, (x, ids, torch.rand(7, 2), block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()))
    with torch.device("meta"):
        out = moe(torch.empty(5, 4096), torch.empty(5, 2, dtype=torch.long), torch.empty(5, 2),
                  torch.empty(8, 2 * 14336, 4096), torch.empty(8, 4096, 14336))
    assert out.shape == (5, 4096)


def test_ids_outside_the_experts_contribute_nothing():
    # transformers' expert-parallel sentinels (ids >= E) are masked to zero; so are they here
    block = mixtral_block()
    block.experts._is_expert_parallel = True  # transformers 5.24 masks only then; 5.17 always
    x = torch.randn(7, 32)
    with torch.no_grad():
        _, weights, ids = block.gate(x)
    ids = ids.clone()
    ids[::2, 1] = 4  # = E: a sentinel
    with torch.no_grad():
        expected = block.experts(x, ids, weights)
    got = moe(x, ids, weights, block.experts.gate_up_proj.detach(), block.experts.down_proj.detach())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 7, 100])
def test_dense_and_grouped_paths_agree(num_tokens):
    """Decode-sized batches run every expert (no host sync, CUDA-graph safe); larger ones group by
    expert. Both compute the same thing, out-of-range ids included."""
    from autodeploy.custom_ops.moe import _moe_dense, _moe_grouped

    gen = torch.Generator().manual_seed(num_tokens)
    experts, top_k, hidden, inter = 4, 2, 16, 24
    x = torch.randn(num_tokens, hidden, generator=gen)
    ids = torch.randint(0, experts + 1, (num_tokens, top_k), generator=gen)  # id == experts: a sentinel
    weights = torch.rand(num_tokens, top_k, generator=gen)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.1
    w_down = torch.randn(experts, hidden, inter, generator=gen) * 0.1
    dense = _moe_dense(x, ids, weights, w_gate_up, w_down)
    grouped = _moe_grouped(x, ids, weights, w_gate_up, w_down)
    torch.testing.assert_close(dense, grouped, rtol=1e-5, atol=1e-6)
    assert dense.abs().sum() > 0


@pytest.mark.parametrize("num_tokens", [7, 64, 65, 300])  # both sides of DENSE_MAX_TOKENS (64)
@pytest.mark.parametrize("bounds", [(0, 3, 8), (0, 4, 8), (0, 2, 5, 8)])
def test_expert_parallel_shards_sum_to_the_whole(num_tokens, bounds):
    """Under expert parallelism each rank holds experts [lo, hi) and sees ids shifted by -lo, so the
    other ranks' experts are negative or >= its expert count; each rank's output for its own experts,
    summed over the ranks (the all-reduce), is the unsharded result, on the dense and grouped path."""
    from autodeploy.custom_ops.moe import _moe_dense, _moe_grouped

    gen = torch.Generator().manual_seed(num_tokens)
    experts, top_k, hidden, inter = bounds[-1], 3, 16, 24
    x = torch.randn(num_tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.1
    w_down = torch.randn(experts, hidden, inter, generator=gen) * 0.1
    whole = moe(x, ids, weights, w_gate_up, w_down)
    for path in (moe, _moe_dense, _moe_grouped):
        parts = [path(x, ids - lo, weights, w_gate_up[lo:hi], w_down[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
        assert all(p.abs().sum() > 0 for p in parts)
        torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-5)
