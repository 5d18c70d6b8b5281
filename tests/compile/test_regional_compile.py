"""Regional compile (``compile_model.regional``, the default): the graph cut at its cache ops,
each distinct region compiled once. Run as a user would, through ``LLM`` with torch-compile on
the CPU: greedy generation equals HF ``generate``, and dynamo compiles twice per distinct region
(the one-token steps apart: ``compiles=two``), however many layers share it."""

import re
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deep_tiny import deep_tiny_model, hf_greedy  # noqa: E402

from autodeploy.compile import CompiledGraph  # noqa: E402
from autodeploy.compile.regions import CompiledRegion  # noqa: E402

PROMPTS = [[1, 5, 9, 22, 41, 7], [1] + [100] * 11, [1, 3], [1, 17, 18, 19, 20, 21, 22, 23, 24]]
LATE = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 60]]
BUILD = dict(device="cpu", compile_backend="torch-compile", max_batch_size=4, max_seq_len=64, attn_page_size=8,
             max_num_tokens=12)  # 12 tokens a step: long prompts are chunked, later ones share steps with decodes


def _compiles() -> int:
    return counters["stats"]["unique_graphs"]


def _greedy(n):
    from autodeploy import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep_tiny")
    return {name: deep_tiny_model(name, root / name) for name in ("tiny_llama", "tiny_hybrid")}


def _note(llm) -> str:
    return next(r["note"] for r in llm.build_report if r["name"] == "compile_model")


def _regions(model: CompiledGraph) -> list[CompiledRegion]:
    return [m for m in model.compiled.modules() if isinstance(m, CompiledRegion)]


def test_regional_llama_matches_hf_and_compiles_each_region_twice(deep_models):
    """Four Llama layers: 5 regions (embedding to the first attention, 3 between attentions, the
    last to the logits), 3 distinct. Steps of every kind (one prompt, prompts of several lengths,
    decode batches of 4..1, prompts arriving while others decode) run the regions compiled at the
    build's first prefill, plus their one-token compiles (``compiles=two``)."""
    from transformers import AutoModelForCausalLM

    from autodeploy import LLM

    path = deep_models["tiny_llama"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    before = _compiles()
    llm = LLM(str(path), **BUILD)
    model = llm.engine.model
    assert isinstance(model, CompiledGraph)
    assert llm.engine.vocab_size == hf.config.vocab_size  # found inside the first region
    assert re.fullmatch(r"5 regions, 3 distinct \(\d+ nodes x1, \d+ nodes x3, \d+ nodes x1\)", model.regions)
    assert "regional: 5 regions, 3 distinct" in _note(llm)
    regions = _regions(model)
    assert sorted(r.num_uses for r in regions) == [1, 1, 3]
    outer = [n for n in model.compiled.graph.nodes if n.op == "call_module"]
    assert len(outer) == 5 and len({n.target for n in outer}) == 3
    # the outer graph reads its weights as attributes of its own (not through the module tree),
    # the very tensors the model holds
    held = {t.data_ptr() for t in [*model.compiled.parameters(), *model.compiled.buffers()]}
    weights = [n.target for n in model.compiled.graph.nodes if n.op == "get_attr"]
    assert weights and all("." not in t and getattr(model.compiled, t).data_ptr() in held for t in weights)
    assert _compiles() - before == 3  # the first prefill at build: each distinct region once

    # the cache ops, run by the outer graph, get the engine's metadata views, not copies
    as_views = _watch_page_tables(model.compiled)

    engine = llm.engine
    reqs = engine.add_requests(PROMPTS, _greedy(6))
    for _ in range(3):
        engine.step()
    reqs += engine.add_requests(LATE, _greedy(5))
    while engine.has_unfinished_requests:
        engine.step()
    for prompt, r in zip(PROMPTS + LATE, reqs):
        n = 6 if prompt in PROMPTS else 5
        assert engine.output(r).token_ids == hf_greedy(hf, prompt, n), prompt
    one = [[1, 40, 41, 42]]
    (req,) = engine.add_requests(one, _greedy(4))  # a one-prompt prefill, then batch-1 decodes
    while engine.has_unfinished_requests:
        engine.step()
    assert engine.output(req).token_ids == hf_greedy(hf, one[0], 4)
    assert _compiles() - before == 6
    # only what a region reads is copied (the last region reads logits_idx, the rows it gathers)
    assert [n for n, _ in model._copied_dims] == ["input_ids", "position_ids", "logits_idx"]
    assert as_views and all(as_views)


def _watch_page_tables(gm):
    """Record, for every cached-attention call of ``gm``, whether its page table is a view into
    the engine's buffer (``SequenceInfo``) rather than a copy."""
    seen = []

    def watched(op):
        def call(q, k, v, seq_len, input_pos, cu_seqlen, page_table, *rest, **kw):
            seen.append(page_table.storage_offset() > 0)
            return op(q, k, v, seq_len, input_pos, cu_seqlen, page_table, *rest, **kw)
        return call

    for node in gm.graph.nodes:
        if node.op == "call_function" and "cached_attention" in str(node.target):
            node.target = watched(node.target)
    gm.recompile()
    return seen


def test_regional_hybrid_matches_hf(deep_models):
    """Mamba, attention and MLP blocks (tiny_hybrid's pattern twice): cut at the attention and the
    SSM cache ops; the blocks that repeat share their region."""
    from transformers import AutoModelForCausalLM

    from autodeploy import LLM

    path = deep_models["tiny_hybrid"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), **BUILD)
    model = llm.engine.model
    assert model.regions is not None and model.regions.startswith("11 regions, 6 distinct")
    assert max(r.num_uses for r in _regions(model)) > 1
    outs = llm.generate(PROMPTS, _greedy(6))
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 6) for p in PROMPTS]


def test_graphs_without_repeats_or_with_regional_off_compile_whole(deep_models):
    """The two-layer tiny Llama has no region that repeats, ``regional=false`` turns the cut off,
    and ``compiles=one`` does not cut: all compile the whole graph, once. The roofline's weight bytes see through the regions
    (tables only looked up, like the embedding, are not streamed)."""
    from autodeploy import LLM
    from autodeploy.bench.roofline import streamed_weights

    before = _compiles()
    llm = LLM("tiny_llama", **BUILD)
    assert llm.engine.model.regions is None and not _regions(llm.engine.model)
    off = LLM(str(deep_models["tiny_llama"]), transforms={"compile_model": {"regional": False}}, **BUILD)
    assert off.engine.model.regions is None and not _regions(off.engine.model)
    assert "regional" not in _note(off)
    one = LLM(str(deep_models["tiny_llama"]), transforms={"compile_model": {"compiles": "one"}}, **BUILD)
    assert one.engine.model.regions is None
    assert _compiles() - before == 3
    regional = LLM(str(deep_models["tiny_llama"]), **BUILD)
    assert regional.engine.model.regions is not None
    assert streamed_weights(regional.engine.model) == streamed_weights(off.engine.model)


def test_regional_with_tensor_parallel_matches_hf(deep_models):
    """Two ranks (gloo): the regions hold the all-reduces of the sharded layers."""
    from transformers import AutoModelForCausalLM

    from autodeploy import LLM

    path = deep_models["tiny_llama"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with LLM(str(path), world_size=2, **{**BUILD, "max_num_tokens": 64}) as llm:
        assert llm.engine.model.regions.startswith("5 regions, 3 distinct")
        outs = llm.generate(PROMPTS, _greedy(6), use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 6) for p in PROMPTS]
