"""insert_cached_attention / initialize_cache / resize_kv_cache on an exported toy LM."""

import pytest
import torch

from autodeploy.runtime.engine import Engine
from autodeploy.runtime.kv_cache import CacheInterface
from autodeploy.runtime.sampling_params import SamplingParams
from autodeploy.transforms.interface import BuildContext
from autodeploy.transforms.optimizer import InferenceOptimizer
from runtime_fakes import ToyLM

CACHE_TRANSFORMS = {
    "insert_cached_attention": {"stage": "cache_init", "backend": "torch"},
    "initialize_cache": {"stage": "cache_init"},
    "resize_kv_cache": {"stage": "cache_init", "free_mem_ratio": 0.5},
}


def build(toy, max_batch_size=4, max_seq_len=64, page_size=4, max_num_tokens=None):
    torch.manual_seed(0)
    ctx = BuildContext(cache=CacheInterface(max_batch_size, max_seq_len, max_num_tokens, page_size, "cpu"))
    optimizer = InferenceOptimizer(CACHE_TRANSFORMS)
    gm = optimizer(ctx, model=toy.export())
    return gm, ctx, optimizer.report


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return ToyLM().eval()


def test_graph_takes_flattened_inputs_and_caches(toy):
    gm, ctx, report = build(toy)
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert names == ["input_ids", "position_ids", "seq_len", "input_pos", "cu_seqlen", "page_table", "slot_idx",
                     "k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("autodeploy.attention." in t for t in targets)
    assert sum("torch_cached_attention" in t for t in targets) == 2
    assert ctx.cache.tensors["k_cache_0"].shape == (ctx.cache.num_pages, 4, 2, 8)
    assert ctx.cache.num_pages == 4 * 16 + 1  # CPU: max_batch_size x max_seq_len, + scratch page
    rows = {r.name: r for r in report}
    assert rows["insert_cached_attention"].num_matches == 2
    assert rows["initialize_cache"].num_matches == 4
    assert "cpu" in rows["resize_kv_cache"].note


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 5}, {"logit_cap": 3.0}])
def test_greedy_equals_full_recompute(variant):
    torch.manual_seed(1)
    toy = ToyLM(**variant).eval()
    gm, ctx, _ = build(toy)
    prompts = [[3, 9, 4], [1] * 11, [7], [5, 2, 8, 8, 1, 30, 2]]
    outs = Engine(gm, ctx.cache).generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] == [toy.greedy(p, 10) for p in prompts]


def test_mixed_and_chunked_batches_match_running_alone(toy):
    gm, ctx, _ = build(toy, max_num_tokens=6, max_batch_size=3)
    engine = Engine(gm, ctx.cache)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[3, 9, 4, 4, 5, 6, 7, 8, 9, 10, 11], [2, 2], [6, 1, 2, 3], [9] * 9]
    together = [o.token_ids for o in engine.generate(prompts, sp)]
    alone = [engine.generate([p], sp)[0].token_ids for p in prompts]
    assert together == alone == [toy.greedy(p, 8) for p in prompts]


def test_page_pressure_preempts_and_matches(toy):
    gm, ctx, _ = build(toy, max_batch_size=4, max_seq_len=32, page_size=4)
    ctx.cache.resize(ctx.cache.pages_per_seq + 3)
    engine = Engine(gm, ctx.cache)
    prompts = [[i + 1] * (6 + i) for i in range(5)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [toy.greedy(p, 14) for p in prompts]
