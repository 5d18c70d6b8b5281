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


@pytest.mark.parametrize("variant", [
    {}, {"sliding_window": 5}, {"logit_cap": 3.0},
    {"sinks": True, "alibi": True, "sliding_window": 6, "attention_chunk_size": 5},  # each alone: test_torch_cached_attention
    {"index_positions": True},  # arange(S) as positions: read from position_ids in the flattened batch
])
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


def test_pages_for_budget_grows_into_free_memory_and_caps():
    from autodeploy.runtime.kv_cache import CacheSpec
    from autodeploy.transforms.library.kvcache import pages_for_budget

    cache = CacheInterface(max_batch_size=8, max_seq_len=256, max_num_tokens=64, page_size=16, device="cpu")
    cache.add_cache(CacheSpec("k_cache_0", (16, 2, 8), torch.float32, paged=True))
    cache.add_cache(CacheSpec("v_cache_0", (16, 2, 8), torch.float32, paged=True))
    cache.add_cache(CacheSpec("ssm_state_0", (4, 8, 16), torch.float32, paged=False))  # not per page
    assert cache.bytes_per_page == 2 * 16 * 2 * 8 * 4
    cache.num_pages = base = 20  # as the (small) initial GPU allocation
    assert pages_for_budget(cache, 10 * cache.bytes_per_page, 0.5) == base + 5
    assert pages_for_budget(cache, 10**12, 0.9) == 8 * 16 + 1  # capped: max_batch_size full sequences
    small = CacheInterface(max_batch_size=1, max_seq_len=256, page_size=16, device="cpu")
    small.add_cache(CacheSpec("k_cache_0", (16, 2, 8), torch.float32, paged=True))
    small.num_pages = 3
    with pytest.raises(RuntimeError, match="not enough GPU memory"):
        pages_for_budget(small, 0, 0.5)


def test_resize_kv_cache_config_checks_ratio():
    from autodeploy.transforms.interface import build_config

    with pytest.raises(ValueError, match="free_mem_ratio"):
        build_config("resize_kv_cache", {"stage": "cache_init", "free_mem_ratio": 1.5})


def test_unknown_backend_fails_before_model_work(monkeypatch):
    """At config time: composing the experiment fails; no model is built or exported."""
    from autodeploy.config import ConfigError, compose_experiment
    from autodeploy.models.factory import ModelFactory

    def no_model_work(*args, **kwargs):
        raise AssertionError("model work started")

    monkeypatch.setattr(ModelFactory, "__init__", no_model_work)
    for argv in (["args.attn_backend=torhc"], ["args.transforms.insert_cached_attention.backend=torhc"]):
        with pytest.raises(ConfigError, match="unknown attention backend 'torhc'.*did you mean torch"):
            compose_experiment(argv)


def test_uncached_attention_left_in_the_graph_fails_the_build(toy):
    from autodeploy.transforms.interface import TransformError

    ctx = BuildContext(cache=CacheInterface(2, 16, None, 4, "cpu"))
    with pytest.raises(TransformError, match=r"uncached sequence ops \(2 x attention\); add insert_cached_attention"):
        InferenceOptimizer({"resize_kv_cache": {"stage": "cache_init"}})(ctx, model=toy.export())


def test_cache_dtype_options_are_checked_at_config_time():
    from autodeploy.transforms.interface import build_config

    with pytest.raises(ValueError, match="insert_cached_attention.cache_dtype must be auto"):
        build_config("insert_cached_attention", {"stage": "cache_init", "cache_dtype": "fp8"})
    with pytest.raises(ValueError, match="insert_cached_ssm.ssm_state_dtype"):
        build_config("insert_cached_ssm", {"stage": "cache_init", "ssm_state_dtype": "int8"})


def test_bfloat16_kv_cache_for_a_float32_model(toy):
    ctx = BuildContext(cache=CacheInterface(2, 32, None, 4, "cpu"))
    pipeline = {"insert_cached_attention": {"stage": "cache_init", "cache_dtype": "bfloat16"},
                "initialize_cache": {"stage": "cache_init"}}
    gm = InferenceOptimizer(pipeline)(ctx, model=toy.export())
    assert ctx.cache.tensors["k_cache_1"].dtype == torch.bfloat16
    out = Engine(gm, ctx.cache).generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out[0].error is None and len(out[0].token_ids) == 4


def test_engine_rejects_ids_past_the_vocabulary_it_is_told(toy):
    gm, ctx, _ = build(toy)

    class Wrapper(torch.nn.Module):  # as compile_model's wrappers: the graph is a submodule
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    engine = Engine(Wrapper(gm), ctx.cache, vocab_size=64)  # build_engine: the factory's config.vocab_size
    out = engine.generate([[3, 70]], SamplingParams(temperature=0, max_tokens=2))[0]
    assert out.finish_reason == "error" and "out of range [0, 64)" in out.error


def test_index_positions_become_position_ids():
    torch.manual_seed(1)
    gm, _, _ = build(ToyLM(index_positions=True).eval())
    aranges = [n for n in gm.graph.nodes if n.op == "call_function" and "arange" in str(n.target)]
    assert aranges == []


def test_backend_without_a_variant_fails_naming_it():
    from autodeploy.custom_ops.cached_attention import BACKENDS, _load_builtin

    _load_builtin()
    flashinfer = BACKENDS["flashinfer"]  # no GPU needed: the check is on the graph's arguments
    with pytest.raises(ValueError, match="'flashinfer' does not support attention sinks, chunked attention "
                                         r"\(attention attention_3\); use backend=torch or backend=triton"):
        flashinfer.check_features("attention_3", {"sliding_window": 4, "sinks": object(), "attention_chunk_size": 8})
    flashinfer.check_features("attention_1", {"sliding_window": 4, "logit_cap": 30.0, "sinks": None})


class CumsumLM(torch.nn.Module):
    """Token mixing by a running sum over the sequence: right in one forward, wrong over a cache."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64)

    def forward(self, input_ids, position_ids):
        return self.head(self.embed(input_ids).cumsum(dim=1))


def test_scan_over_the_sequence_left_in_the_graph_fails_the_build():
    from autodeploy.transforms.interface import TransformError

    model = CumsumLM().eval()
    ids, pos = torch.randint(0, 64, (2, 7)), torch.arange(7).expand(2, 7)
    b, s = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=256)
    gm = torch.export.export(model, (ids, pos), dynamic_shapes={"input_ids": {0: b, 1: s}, "position_ids": {0: b, 1: s}})
    ctx = BuildContext(cache=CacheInterface(2, 16, None, 4, "cpu"))
    with pytest.raises(TransformError, match=r"mixes tokens in plain graph code \(cumsum = aten.cumsum.default"):
        InferenceOptimizer({"initialize_cache": {"stage": "cache_init"}})(ctx, model=gm.module())
