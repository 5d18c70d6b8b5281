"""One torch.compile serves every batch shape (torch-compile and, emulated on the CPU, torch-opt).

Dynamo specializes sizes 0 and 1 and ties equal sizes together; the compiled graph marks its
batch dims unbacked so that a one-token decode, a one-prompt prefill, decode batches of any size
and mixed batches all run the graph compiled at the first call. Counted here: dynamo frames
compiled (``counters["stats"]["unique_graphs"]``), which counts an inductor cache hit too.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deep_tiny import hf_greedy  # noqa: E402
from toy_lm import PagedBatcher, apply_compile, rel, schedule, toy_caches, toy_graph  # noqa: E402

from autodeploy.compile import CompiledGraph, CudaGraphRunner, placeholder_names  # noqa: E402
from autodeploy.compile.cudagraph import _Graph, decode_pad_inputs  # noqa: E402


def _compiles() -> int:
    return counters["stats"]["unique_graphs"]


def _record_shapes(model, shapes, monkeypatch):
    """Wraps ``model.forward`` (an instance's, or a class's for all its instances) to record (T, B) of each call."""
    forward = model.forward

    def recording(*args, **kwargs):
        shapes.append((kwargs["input_ids"].shape[-1], kwargs["seq_len"].shape[0]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)


# ---- torch-compile through the real pipeline and engine ----


@pytest.fixture(scope="module")
def hf_tiny_llama():
    from transformers import AutoModelForCausalLM

    from autodeploy.models.tiny import ensure_tiny_model

    return AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny_llama"), dtype=torch.float32).eval()


@pytest.mark.parametrize("compiles", ["one", "two"])
def test_torch_compile_compiles_once_for_every_batch(hf_tiny_llama, monkeypatch, compiles):
    """The first call, at build, is a prefill (inductor tunes its kernels at that call's sizes);
    then every step of the engine runs the graph it compiled ("one"), or that graph and one more
    for the one-token steps ("two")."""
    from autodeploy import LLM, SamplingParams

    shapes: list[tuple[int, int]] = []
    _record_shapes(CompiledGraph, shapes, monkeypatch)  # every CompiledGraph, from the build on
    before = _compiles()
    # max_num_tokens=12 chunks the longer prompts, so later prefills share steps with decodes
    llm = LLM("tiny_llama", device="cpu", compile_backend="torch-compile", max_batch_size=4, max_seq_len=64,
              attn_page_size=8, max_num_tokens=12, transforms={"compile_model": {"compiles": compiles}})
    engine = llm.engine
    assert isinstance(engine.model, CompiledGraph)
    assert engine.vocab_size == hf_tiny_llama.config.vocab_size  # found through the compiled wrappers
    assert shapes == [(12, 1)]  # at build: one prompt of min(max_num_tokens, prefill_chunk_size) tokens
    assert _compiles() - before == 1
    cache = engine.cache  # its pages were freed, the free list is as new: the first request gets page 1
    assert cache.num_used_pages == 0 and cache._free_pages == list(range(cache.num_pages - 1, 0, -1))

    def greedy(n):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def check(prompts, lengths, requests):
        for p, n, r in zip(prompts, lengths, requests):
            assert engine.output(r).token_ids == hf_greedy(hf_tiny_llama, p, n), (p, n)

    # one prompt: a one-prompt prefill, then one-token decodes
    one = [[1, 5, 9, 22, 41, 7]]
    reqs = engine.add_requests(one, greedy(5))
    _run(engine)
    check(one, [5], reqs)
    # prompts of different lengths finishing at different steps: decode batches of 3, 2 and 1
    several = [[1] + [100] * 11, [1, 3], [1, 17, 18, 19, 20, 21, 22, 23, 24]]
    lengths = [2, 5, 8]
    reqs = [engine.add_requests([p], greedy(n))[0] for p, n in zip(several, lengths)]
    _run(engine)
    check(several, lengths, reqs)
    # mixed steps: prompts arriving while others decode
    first = [[1, 40, 41, 42], [1] + [7] * 9]
    late = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 60]]
    reqs = [engine.add_requests([p], greedy(6))[0] for p in first]
    for _ in range(3):
        engine.step()
    reqs += [engine.add_requests([p], greedy(6))[0] for p in late]
    _run(engine)
    check(first + late, [6] * 4, reqs)
    # prompt logprobs: every row of a prompt's chunks (logits_idx longer than the batch, G > B) and
    # one row for the request beside it; the same compiled graphs, HF's log_softmax
    asks = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    with_logprobs = [[1] + list(range(30, 50)), [1, 2, 3]]  # 21 tokens: chunks of max_num_tokens=12
    reqs = engine.add_requests(with_logprobs, [asks, greedy(4)])
    _run(engine)
    check(with_logprobs, [4, 4], reqs)
    out = engine.output(reqs[0])
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        ref = hf_tiny_llama(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:] + out.logprobs, ids[1:])]
    assert len(got) == len(ids) - 1 and max(abs(g - ref[i, t].item()) for i, (g, t) in enumerate(zip(got, ids[1:]))) < 1e-4

    decodes = {b for t, b in shapes if t == b}
    assert {1, 2, 3} <= decodes, shapes
    assert any(t > b > 1 for t, b in shapes), shapes  # a mixed (or multi-prompt) step
    assert (6, 1) in shapes  # the one-prompt prefill
    expected = {"one": 1, "two": 2}[compiles]  # "two": the one-token decodes compiled apart
    assert _compiles() - before == expected, f"{_compiles() - before} compiles for the shapes {sorted(set(shapes))}"


def _run(engine):
    while engine.has_unfinished_requests:
        engine.step()


# ---- torch-opt's order of calls, emulated on the CPU ----


class _RerunGraph:
    def __init__(self, fn):
        self.replay = fn


class _CpuRunner(CudaGraphRunner):
    """The CUDA-graph runner with 'graphs' that re-run the model on their static buffers (as in
    test_compile_model_cpu.py), but with torch-opt's calls: warm-ups of every decode size,
    largest first, then eager prefills and mixed batches."""

    def capture(self, example):
        static = {n: example[n] for n in self.static_names}
        for bs in sorted(self.batch_sizes, reverse=True):
            g = _Graph(bs, {**decode_pad_inputs(bs, example), **static})
            for _ in range(self.warmup_iters):
                self.model(**g.inputs)
            g.output = self.model(**g.inputs)

            def replay(g=g):
                g.output.copy_(self.model(**g.inputs))

            g.graph = _RerunGraph(replay)
            self.graphs[bs] = g


@pytest.mark.parametrize("compiles", ["one", "two", "dynamic"])
def test_torch_opt_calls_compile_once(compiles):
    """Captures at build (outside inference mode, as compile_model does), largest first, then the
    engine's steps under inference mode: replays, eager prefills and a mixed batch. "one" compiles
    once, "two" twice (the one-token capture apart), "dynamic" (dynamic=True) more often."""
    gm = toy_graph()
    compiled, _ = apply_compile(toy_graph(), "cpu", backend="torch-compile", compiles=compiles)
    runner = _CpuRunner(compiled, placeholder_names(gm), [1, 2, 4, 8])
    caches_ref, caches_new = toy_caches(48), toy_caches(48)
    before = _compiles()
    runner.capture({**PagedBatcher().batch({0: [0]}), **caches_new})
    assert runner.captured_sizes == [1, 2, 4, 8]
    b_ref, b_new = PagedBatcher(), PagedBatcher()
    with torch.inference_mode():
        for i, step in enumerate(schedule(torch.Generator().manual_seed(0))):
            ref = gm(**b_ref.batch(step), **caches_ref)
            new = runner(**b_new.batch(step), **caches_new)
            assert new.shape == ref.shape and rel(new, ref) < 1e-5, f"step {i}"
    assert runner.num_replays == 7 and runner.num_eager == 2  # eager: the prefill and the mixed step
    n = _compiles() - before
    assert {"one": n == 1, "two": n == 2, "dynamic": n > 2}[compiles], n


@pytest.mark.parametrize("compiles", ["one", "two", "dynamic"])
def test_torch_opt_first_call_is_a_prefill(monkeypatch, compiles):
    """compile_model's torch-opt path, emulated on the CPU (the runner above; compile_graph told it
    is on CUDA): with the cache manager's tensors, the compiled graph's first call is a prefill,
    before every capture; the pages it used are free again, and the steps after it still equal
    eager and compile nothing more ("two": the one-token capture compiles apart). "dynamic": no
    prefill, the captures come first."""
    import autodeploy.compile as compile_pkg
    from autodeploy.runtime.kv_cache import CacheInterface, CacheSpec

    monkeypatch.setattr(compile_pkg, "CudaGraphRunner", _CpuRunner)
    monkeypatch.setattr(compile_pkg, "_on_cuda", lambda device: True)
    cache = CacheInterface(max_batch_size=8, max_seq_len=64, page_size=8)  # 512 tokens, pages of the batcher's width
    for name, t in toy_caches(1).items():
        cache.add_cache(CacheSpec(name, tuple(t.shape[1:]), t.dtype, paged=True))
    cache.initialize()
    shapes: list[tuple[int, int]] = []
    _record_shapes(CompiledGraph, shapes, monkeypatch)
    gm = toy_graph()
    before = _compiles()
    runner, info = apply_compile(toy_graph(), "cuda", cache=cache, backend="torch-opt",
                                 cuda_graph_batch_sizes=[1, 2, 4, 8], compiles=compiles)
    assert isinstance(runner, _CpuRunner) and runner.captured_sizes == [1, 2, 4, 8]
    marked = compiles != "dynamic"
    prefill = [(512, 8)] if marked else []  # 8 prompts of 64 tokens, then the captures
    assert shapes[:len(prefill)] == prefill and all(t == b for t, b in shapes[len(prefill):]), shapes
    assert ("first call a 512-token prefill" in info.note) == marked
    assert cache.num_used_pages == 0 and cache._free_pages == list(range(cache.num_pages - 1, 0, -1))
    caches_ref = toy_caches(cache.num_pages)  # zeros; cache.tensors hold the prefill's K/V in free pages
    b_ref, b_new = PagedBatcher(), PagedBatcher()
    with torch.inference_mode():
        for i, step in enumerate(schedule(torch.Generator().manual_seed(0))):
            ref = gm(**b_ref.batch(step), **caches_ref)
            new = runner(**b_new.batch(step), **cache.tensors)
            assert new.shape == ref.shape and rel(new, ref) < 1e-5, f"step {i}"
    n = _compiles() - before
    assert runner.num_replays == 7 and {"one": n == 1, "two": n == 2, "dynamic": n > 2}[compiles], n


@pytest.mark.parametrize("compiles", ["one", "two"])
def test_engine_views_at_storage_offsets_compile_once(compiles):
    """The engine's inputs are views of one buffer (``SequenceInfo``): after the header (two int64
    slots) input_ids, then position_ids at 2 + T, the metadata further on. Storage offsets are no
    reason to compile again ("two": one more for the one-token steps)."""
    from autodeploy.runtime.sequence_info import HEADER, SequenceInfo

    gm = toy_graph()
    compiled, _ = apply_compile(toy_graph(), "cpu", backend="torch-compile", compiles=compiles)
    names = placeholder_names(gm)
    caches_ref, caches_new = toy_caches(48), toy_caches(48)
    batcher, info = PagedBatcher(), SequenceInfo(8, 64, 8)
    before = _compiles()
    with torch.inference_mode():
        for step in ({0: [3, 4, 5], 1: [6, 7]}, {0: [8], 1: [9]}, {1: [10]}, {2: [11]}, {0: [12], 2: [13, 14]}):
            batch = batcher.batch(step)
            views = info.build(list(step.values()), batch["input_pos"].tolist(), batch["page_table"].tolist(),
                               [0] * len(step)).named_args
            assert views["input_ids"].storage_offset() == HEADER // 2
            assert views["position_ids"].storage_offset() == HEADER // 2 + batch["input_ids"].shape[1]
            ref = gm(**batch, **caches_ref)
            new = compiled(**{n: views[n] for n in names if n in views}, **caches_new)
            assert rel(new, ref) < 1e-5
    assert _compiles() - before == {"one": 1, "two": 2}[compiles]


@pytest.mark.parametrize("compiles", ["one", "two"])
def test_size_checks_bound_the_batch_dims(compiles):
    """With the cache manager's limits, the graph checks T <= max_num_tokens and B <= max_batch_size
    (bounded sizes let inductor index in 32 bits); a larger step fails, a smaller one never recompiles
    ("two": the one-token step compiles apart)."""
    from types import SimpleNamespace

    gm = toy_graph()
    cache = SimpleNamespace(info=SimpleNamespace(max_num_tokens=16, max_batch_size=4))  # no tensors: no capture
    compiled, _ = apply_compile(toy_graph(), "cpu", cache=cache, backend="torch-compile", compiles=compiles)
    code = compiled.compiled._orig_mod.code
    assert "input_ids.size(1)" in code and "<= 16" in code and "seq_len.size(0)" in code and "<= 5" in code
    caches_ref, caches_new = toy_caches(48), toy_caches(48)
    b_ref, b_new = PagedBatcher(), PagedBatcher()
    before = _compiles()
    with torch.inference_mode():
        for step in ({0: list(range(10)), 1: [1, 2, 3, 4, 5, 6]}, {0: [7], 1: [8]}, {1: [9]}):
            ref = gm(**b_ref.batch(step), **caches_ref)
            assert rel(compiled(**b_new.batch(step), **caches_new), ref) < 1e-5
        assert _compiles() - before == {"one": 1, "two": 2}[compiles]
        with pytest.raises(ValueError, match="input_ids has 17 .* at most 16"):
            compiled(**b_new.batch({5: list(range(17))}), **caches_new)


def test_blas_library_this_torch_lacks_is_skipped_with_one_warning(caplog, monkeypatch):
    """cuBLASLt for the large decode captures: a torch built without it (this CPU wheel refuses it)
    keeps its library, warns once, and the block still runs."""
    import logging

    from autodeploy.compile import cudagraph

    monkeypatch.setattr(cudagraph, "_BLAS_REFUSED", set())
    before = torch.backends.cuda.preferred_blas_library()
    ran = 0
    with caplog.at_level(logging.WARNING, logger="autodeploy.compile.cudagraph"):
        for _ in range(2):
            with cudagraph.blas_library("cublaslt"):
                ran += 1
                if "cublaslt" not in cudagraph._BLAS_REFUSED:  # this torch has it: it is in effect here
                    assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt
    assert ran == 2 and torch.backends.cuda.preferred_blas_library() == before
    warned = [r for r in caplog.records if "not available" in r.getMessage()]
    assert len(warned) == ("cublaslt" in cudagraph._BLAS_REFUSED)
