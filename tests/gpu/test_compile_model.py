"""compile_model on a GPU: CUDA-graph replay (torch-cudagraph, torch-opt) equals eager."""

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_lm import CACHE_NAMES, DECODE_STEPS, PagedBatcher, apply_compile, rel, run_both, toy_caches, toy_graph  # noqa: E402

from autodeploy.compile import CudaGraphRunner  # noqa: E402


def _check_replay(runner, gm, dtype=torch.float32, tol=1e-4):
    outs, c_ref, c_new = run_both(gm, runner, "cuda", dtype)
    for i, (ref, new) in enumerate(outs):
        assert torch.isfinite(new).all()
        assert rel(new, ref) < tol, f"step {i}"
    for n in CACHE_NAMES:  # padded rows only ever wrote into scratch page 0
        assert rel(c_new[n][1:].float(), c_ref[n][1:].float()) < tol
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["triton_cached_attention", "torch_cached_attention"])
def test_cudagraph_replay_equals_eager(op):
    from autodeploy.custom_ops.cached_attention import triton_backend  # noqa: F401

    gm = toy_graph(op, device="cuda")
    runner, info = apply_compile(gm, "cuda", backend="torch-cudagraph", cuda_graph_batch_sizes=[1, 2, 4, 8])
    assert isinstance(runner, CudaGraphRunner) and info.num_matches == 1
    _check_replay(runner, gm)
    assert runner.captured_sizes == [1, 2, 4, 8]  # captured lazily on the first decode step
    steps = 1 + len(DECODE_STEPS) + 1 + 1  # prefill, decodes, mixed, last decode
    assert runner.num_eager == 2 and runner.num_replays == steps - 2


@pytest.mark.gpu
def test_torch_opt_replay_equals_eager():
    from autodeploy.custom_ops.cached_attention import triton_backend  # noqa: F401

    gm = toy_graph("triton_cached_attention", device="cuda")
    runner, _ = apply_compile(gm, "cuda", backend="torch-opt", cuda_graph_batch_sizes=[2, 8])
    _check_replay(runner, gm)
    assert runner.num_replays > 0


@pytest.mark.gpu
def test_capture_on_build_from_cache_manager_and_fallbacks(caplog):
    """With ctx.cache holding the caches, graphs are captured at build; a re-allocated cache or a
    batch larger than every captured size runs eagerly."""
    from autodeploy.custom_ops.cached_attention import triton_backend  # noqa: F401

    gm = toy_graph("triton_cached_attention", device="cuda")
    caches = toy_caches(48, device="cuda")
    batcher = PagedBatcher(device="cuda")

    def decode_batch(bs):
        return SimpleNamespace(named_args=PagedBatcher(device="cuda").batch({i: [0] for i in range(bs)}))

    cache = SimpleNamespace(tensors=caches, info=SimpleNamespace(decode_batch=decode_batch))
    runner, info = apply_compile(gm, "cuda", cache=cache, max_batch_size=4, backend="torch-cudagraph")
    assert runner.captured_sizes == [1, 2, 4] and "[1, 2, 4]" in info.note

    with torch.inference_mode():
        runner(**batcher.batch({i: [1, 2, 3] for i in range(6)}), **caches)  # prefill: eager
        inputs = batcher.batch({i: [4] for i in range(3)})
        ref = gm(**inputs, **{n: t.clone() for n, t in caches.items()})
        assert rel(runner(**inputs, **caches).float(), ref.float()) < 1e-4 and runner.num_replays == 1
        runner(**batcher.batch({i: [5] for i in range(6)}), **caches)  # 6 > 4: eager
        moved = {n: t.clone() for n, t in caches.items()}
        with caplog.at_level(logging.WARNING):
            runner(**batcher.batch({i: [6] for i in range(2)}), **moved)  # other cache tensors: eager
    assert runner.num_replays == 1 and runner.num_eager == 3
    assert any("not the tensor seen at capture" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
@pytest.mark.parametrize("compiles", ["one", "two"])
def test_torch_opt_compile_count(compiles):
    """Warm-ups and captures of every decode size (largest first, one-token decode included), then
    eager prefills and a mixed batch: all run the graph dynamo compiled at the first call ("two":
    and the one-token capture its own)."""
    from torch._dynamo.utils import counters

    from autodeploy.custom_ops.cached_attention import triton_backend  # noqa: F401

    gm = toy_graph("triton_cached_attention", device="cuda")
    runner, _ = apply_compile(toy_graph("triton_cached_attention", device="cuda"), "cuda", backend="torch-opt",
                              cuda_graph_batch_sizes=[1, 2, 4, 8], compiles=compiles)
    before = counters["stats"]["unique_graphs"]
    _check_replay(runner, gm)
    assert runner.captured_sizes == [1, 2, 4, 8] and runner.num_eager == 2
    assert counters["stats"]["unique_graphs"] - before == {"one": 1, "two": 2}[compiles]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch-cudagraph", "torch-opt"])
def test_one_prompt_prefill_graphs_equal_eager(backend):
    """Steps of one sequence with several tokens replay the smallest prefill graph that holds them
    (padded by a second sequence in scratch page 0): same logits and caches as eager; two prompts,
    or more tokens than the largest graph, run eagerly."""
    from autodeploy.compile import compile_graph
    from autodeploy.custom_ops.cached_attention import triton_backend  # noqa: F401

    gm = toy_graph("triton_cached_attention", device="cuda")
    runner, _ = compile_graph(toy_graph("triton_cached_attention", device="cuda"), backend, torch.device("cuda"),
                              [1, 2, 4], prefill_tokens=[16, 32, 64], max_num_tokens=128, max_batch_size=4)
    caches_ref, caches_new = toy_caches(64, device="cuda"), toy_caches(64, device="cuda")
    b_ref, b_new = PagedBatcher(max_pages_per_seq=16, device="cuda"), PagedBatcher(max_pages_per_seq=16, device="cuda")
    runner.capture({**PagedBatcher(max_pages_per_seq=16, device="cuda").batch({0: [0]}), **caches_new})
    assert runner.captured_prefill_tokens == [16, 32, 64] and runner.captured_sizes == [1, 2, 4]
    gen = torch.Generator().manual_seed(1)

    def tok(n):
        return torch.randint(0, 97, (n,), generator=gen).tolist()

    steps = [{0: tok(5)}, {0: tok(1)}, {0: tok(16)}, {1: tok(40)}, {0: tok(1), 1: tok(1)}, {2: tok(64)},
             {3: tok(70)}, {4: tok(3), 5: tok(9)}, {1: tok(31)}, {0: tok(1), 1: tok(1), 2: tok(1)}]
    with torch.inference_mode():
        for i, step in enumerate(steps):
            ref = gm(**b_ref.batch(step), **caches_ref)
            new = runner(**b_new.batch(step), **caches_new)
            assert new.shape == ref.shape and rel(new.float(), ref.float()) < 1e-4, f"step {i}"
    for n in CACHE_NAMES:  # the padding sequence only ever wrote into scratch page 0
        assert rel(caches_new[n][1:].float(), caches_ref[n][1:].float()) < 1e-4
    # 5 -> 16, 16 -> 16 (no padding tokens), 40 -> 64, 64 -> 64, 31 -> 32; 70 tokens and two prompts: eager
    assert runner.num_prefill_replays == 5 and runner.num_eager == 2
