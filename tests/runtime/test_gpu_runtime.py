"""The runtime on CUDA (torch backend): pinned metadata copies, KV sizing from free memory."""

import pytest
import torch

from autodeploy.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 5, 9, 22, 41, 7], [1] + [100] * 12, [1, 3], [1, 17, 18, 19, 20, 21, 22, 23, 24, 25]]


@pytest.fixture(scope="module")
def llama_cuda():
    from tiny_deployment import build_tiny

    return build_tiny("tiny_llama", device="cuda", free_mem_ratio=0.1)


def test_kv_cache_grows_into_free_memory(llama_cuda):
    cache = llama_cuda.cache
    assert cache.tensors["k_cache_0"].is_cuda
    # free memory on any GPU holds every sequence of this tiny config: capped at the useful maximum
    assert cache.num_pages == cache.max_batch_size * cache.pages_per_seq + 1
    report = {r.name: r for r in llama_cuda.report}
    assert "free_mem_ratio=0.1" in report["resize_kv_cache"].note


def test_greedy_matches_hf_on_cuda(llama_cuda):
    engine = llama_cuda.engine()
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] == [llama_cuda.hf_greedy(p, 10, ignore_eos=True) for p in PROMPTS]


def test_sampling_on_cuda_matches_cpu_draws():
    from autodeploy.runtime.sampler import Sampler, SamplingBatch

    logits = torch.randn(4, 300)
    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=s) for s in range(4)]
    batch = SamplingBatch.from_params(params, [1, 2, 3, 4], [0, 1, 2, 3])
    cpu = Sampler()(logits, batch)
    gpu = Sampler()(logits.cuda(), batch)
    assert gpu.tolist() == cpu.tolist()


def test_greedy_rows_on_cuda_are_argmax():
    from autodeploy.runtime.sampler import argmax_rows

    logits = torch.randn(32, 128256, device="cuda").to(torch.bfloat16)  # a Llama-3 vocabulary: two passes
    logits[0, 70000] = logits[0, 5] = 100.0  # a tie across slices: the first index wins
    for rows in (1, 2, 32):
        assert torch.equal(argmax_rows(logits[:rows]), logits[:rows].argmax(-1))
    assert argmax_rows(logits)[0] == 5


def test_overlap_scheduler_on_cuda_gives_the_synchronous_tokens(llama_cuda):
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    sync = llama_cuda.engine()
    sync.overlap = False
    ahead = llama_cuda.engine()
    assert ahead.overlap  # on by default with a CUDA device
    assert [o.token_ids for o in ahead.generate(PROMPTS, sp)] == [o.token_ids for o in sync.generate(PROMPTS, sp)]


def test_torch_opt_engine_compile_count():
    """torch-opt over the cached tiny Llama: a prefill (the compiled graph's first call) and CUDA
    graphs captured at build (decode sizes 4, 2, 1), then the engine's prefills (one prompt,
    several), decode batches shrinking 3 -> 1 and mixed steps (prompts arriving while others
    decode); greedy tokens equal HF's, and dynamo compiled the graph twice (compiles="two": the
    one-token steps apart from the rest)."""
    from dataclasses import replace

    from torch._dynamo.utils import counters
    from tiny_deployment import build_tiny

    from autodeploy.config.schema import AutoDeployArgs
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.library.compile_model import CompileModel, CompileModelConfig

    dep = build_tiny("tiny_llama", device="cuda", free_mem_ratio=0.1)
    before = counters["stats"]["unique_graphs"]
    ctx = BuildContext(args=AutoDeployArgs(max_batch_size=dep.cache.max_batch_size), device=torch.device("cuda"), cache=dep.cache)
    runner, info = CompileModel(CompileModelConfig(backend="torch-opt")).apply(dep.graph, ctx)
    assert runner.captured_sizes == [1, 2, 4] and "first call a" in info.note, info.note
    engine = replace(dep, graph=runner).engine()
    lengths = [3, 6, 9, 4]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    first = engine.generate(PROMPTS[:1], params[:1])
    rest = engine.generate(PROMPTS[1:], params[1:])
    assert [o.token_ids for o in first + rest] == [dep.hf_greedy(p, n, ignore_eos=True) for p, n in zip(PROMPTS, lengths)]
    reqs = engine.add_requests(PROMPTS[:2], params[:2])
    for _ in range(2):
        engine.step()
    reqs += engine.add_requests(PROMPTS[2:], params[2:])  # their prefills join the running decodes
    while engine.has_unfinished_requests:
        engine.step()
    assert [engine.output(r).token_ids for r in reqs] == [o.token_ids for o in first + rest]
    assert runner.num_replays > 0 and runner.num_eager > 0
    assert counters["stats"]["unique_graphs"] - before == 2
