"""compile_model on the CPU: config validation, torch-simple, torch-compile, and the CUDA-graph
backends falling back to torch-simple. (GPU replay tests: tests/gpu/test_compile_model.py.)"""

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from toy_lm import CACHE_NAMES, PagedBatcher, apply_compile, rel, run_both, toy_caches, toy_graph  # noqa: E402

from autodeploy.compile import CudaGraphRunner, default_batch_sizes, placeholder_names  # noqa: E402
from autodeploy.compile.cudagraph import _Graph, decode_pad_inputs, prefill_buckets, prefill_pad_inputs  # noqa: E402
from autodeploy.transforms.interface import build_config  # noqa: E402

def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="torch-simple, torch-compile, torch-cudagraph, torch-opt"):
        build_config("compile_model", {"stage": "compile", "backend": "torch-fast"})
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes"):
        build_config("compile_model", {"stage": "compile", "cuda_graph_batch_sizes": [0, 4]})


def test_default_batch_sizes():
    assert default_batch_sizes(1) == [1]
    assert default_batch_sizes(8) == [1, 2, 4, 8]
    assert default_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]


def test_torch_simple_is_the_graph_itself():
    gm = toy_graph()
    out, info = apply_compile(gm, "cpu", backend="torch-simple")
    assert out is gm and info.num_matches == 0


@pytest.mark.parametrize("backend", ["torch-cudagraph", "torch-opt"])
def test_cuda_graph_backends_fall_back_on_cpu(backend, caplog):
    gm = toy_graph()
    with caplog.at_level(logging.WARNING):
        out, info = apply_compile(gm, "cpu", backend=backend)
    assert out is gm and "torch-simple" in info.note
    assert sum(backend in r.getMessage() and "torch-simple" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_torch_compile_matches_eager_on_cpu():
    gm = toy_graph()
    compiled, info = apply_compile(toy_graph(), "cpu", backend="torch-compile")
    assert info.num_matches == 1
    outs, c_ref, c_new = run_both(gm, compiled, "cpu")
    for ref, new in outs:
        assert rel(new, ref) < 1e-5
    for n in CACHE_NAMES:
        torch.testing.assert_close(c_new[n], c_ref[n])




class _RerunGraph:
    def __init__(self, fn):
        self.replay = fn


class _CpuRunner(CudaGraphRunner):
    """The runner with 'graphs' that re-run the model on their static buffers: checks the copy,
    padding and narrowing logic of replay on the CPU."""

    def capture(self, example):
        static = {n: example[n] for n in self.static_names}
        graphs = [(bs, _Graph(bs, {**decode_pad_inputs(bs, example), **static})) for bs in self.batch_sizes]
        graphs += [(None, _Graph(2, {**prefill_pad_inputs(t, example), **static}, tokens=t))
                   for t in self.prefill_tokens]
        for bs, g in graphs:
            g.output = self.model(**g.inputs)

            def replay(g=g):
                g.output.copy_(self.model(**g.inputs))

            g.graph = _RerunGraph(replay)
            if bs is None:
                self.prefill_graphs[g.tokens] = g
            else:
                self.graphs[bs] = g


def test_replay_logic_pads_into_scratch_page():
    gm = toy_graph()
    runner = _CpuRunner(gm, placeholder_names(gm), [2, 4, 8])
    outs, c_ref, c_new = run_both(gm, runner, "cpu")
    for ref, new in outs:
        assert new.shape == ref.shape and rel(new, ref) < 1e-5
    for n in CACHE_NAMES:  # padded rows wrote only into scratch page 0
        torch.testing.assert_close(c_new[n][1:], c_ref[n][1:])
    assert runner.captured_sizes == [2, 4, 8] and runner.num_replays == 7 and runner.num_eager == 2


def test_one_prompt_prefill_replay_pads_with_a_second_sequence():
    """The prefill graphs' copy, padding and narrowing (``_CpuRunner`` re-runs the model on the
    static buffers): a one-sequence step takes the smallest graph that holds its tokens, the other
    tokens form a second sequence in scratch page 0; same outputs and caches as eager."""
    gm = toy_graph()
    runner = _CpuRunner(gm, placeholder_names(gm), [1, 2, 4], prefill_tokens=[16, 32, 48])
    caches_ref, caches_new = toy_caches(48), toy_caches(48)
    b_ref, b_new = PagedBatcher(), PagedBatcher()
    runner.capture({**PagedBatcher().batch({0: [0]}), **caches_new})
    gen = torch.Generator().manual_seed(1)

    def tok(n):
        return torch.randint(0, 97, (n,), generator=gen).tolist()

    steps = [{0: tok(5)}, {0: tok(1)}, {0: tok(16)}, {1: tok(40)}, {0: tok(1), 1: tok(1)}, {2: tok(48)},
             {3: tok(50)}, {4: tok(3), 5: tok(9)}, {2: tok(9)}]
    with torch.inference_mode():
        for i, step in enumerate(steps):
            ref = gm(**b_ref.batch(step), **caches_ref)
            new = runner(**b_new.batch(step), **caches_new)
            assert new.shape == ref.shape and rel(new, ref) < 1e-5, f"step {i}"
    for n in CACHE_NAMES:
        torch.testing.assert_close(caches_new[n][1:], caches_ref[n][1:])
    assert not torch.equal(caches_new["k_cache_0"][0], caches_ref["k_cache_0"][0])  # the padding wrote there
    # 5 -> 16, 16 -> 16 (a padding sequence of no tokens), 40 -> 48, 48 -> 48, 9 -> 16; eager: 50
    # tokens, two prompts
    assert runner.num_prefill_replays == 5 and runner.num_eager == 2 and runner.num_replays == 2


class _GatheringToyLM(torch.nn.Module):
    """The toy LM with the cached graph's logits gather: only the rows of ``logits_idx``."""

    def __init__(self):
        super().__init__()
        self.lm = toy_graph()

    def forward(self, input_ids, position_ids, seq_len, input_pos, cu_seqlen, page_table, logits_idx,
                k_cache_0, v_cache_0, k_cache_1, v_cache_1):
        logits = self.lm(input_ids, position_ids, seq_len, input_pos, cu_seqlen, page_table,
                         k_cache_0, v_cache_0, k_cache_1, v_cache_1)
        return logits.index_select(1, logits_idx)


def test_replay_with_gathered_logits_rows():
    """``logits_idx`` (the rows a gathering graph returns): arange in a decode graph, the real
    sequence's last token in a one-prompt prefill graph; a step that wants every token's logits
    (prompt logprobs) runs eagerly. Same rows as eager either way."""
    gm = torch.fx.symbolic_trace(_GatheringToyLM())
    runner = _CpuRunner(gm, placeholder_names(gm), [1, 2, 4], prefill_tokens=[16, 32])
    caches_ref, caches_new = toy_caches(48), toy_caches(48)
    b_ref, b_new = PagedBatcher(), PagedBatcher()

    def batch(batcher, step, full=()):
        b = batcher.batch(step)
        ends = b["cu_seqlen"].tolist()
        rows = [list(range(s, e)) if sid in full else [e - 1] for sid, s, e in zip(step, ends, ends[1:])]
        return {**b, "logits_idx": torch.tensor(sum(rows, []), dtype=torch.int64)}

    runner.capture({**batch(PagedBatcher(), {0: [0]}), **caches_new})
    steps = [({0: [5, 6, 7, 8, 9]}, ()), ({1: list(range(10, 30))}, (1,)), ({0: [1], 1: [2]}, ()),
             ({2: [3, 4, 5], 0: [6]}, (2,)), ({0: [7], 1: [8], 2: [9]}, ()), ({3: list(range(40, 51))}, ())]
    with torch.inference_mode():
        for i, (step, full) in enumerate(steps):
            inputs = batch(b_new, step, full)
            ref = gm(**batch(b_ref, step, full), **caches_ref)
            new = runner(**inputs, **caches_new)
            assert new.shape == ref.shape == (1, len(inputs["logits_idx"]), 97) and rel(new, ref) < 1e-5, f"step {i}"
    # replays: the two decode-only steps and the two one-prompt prefills of one row each;
    # eager: the prompt with every row, the mixed step
    assert runner.num_replays == 2 and runner.num_prefill_replays == 2 and runner.num_eager == 2


def test_prefill_buckets():
    assert prefill_buckets(1024, 2048, 8192) == list(range(64, 1025, 64))
    assert prefill_buckets(1024, 600, 8192)[-1] == 576  # below max_seq_len: the padding's positions
    assert prefill_buckets(1024, 2048, 256)[-1] == 256
    assert prefill_buckets(0, 2048, 8192) == []


def test_prefill_graphs_need_two_sequences_and_no_moe():
    """The transform's buckets: none with max_batch_size 1 (the padding is a second sequence) or
    for a graph with the moe op (captured, it would run every expert on every prompt token)."""
    from types import SimpleNamespace

    from autodeploy.custom_ops import moe  # noqa: F401 - registers autodeploy::moe
    from autodeploy.transforms.library.compile_model import CompileModelConfig, _prefill_buckets

    cfg = CompileModelConfig(cuda_graph_prefill_tokens=256)
    cache = SimpleNamespace(max_seq_len=1000)
    info = SimpleNamespace(max_batch_size=4, max_num_tokens=4096)
    gm = toy_graph()
    assert _prefill_buckets(cfg, gm, info, cache) == [64, 128, 192, 256]
    assert _prefill_buckets(cfg, gm, SimpleNamespace(max_batch_size=1, max_num_tokens=4096), cache) == []
    assert _prefill_buckets(CompileModelConfig(cuda_graph_prefill_tokens=0), gm, info, cache) == []
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        gm.graph.call_function(torch.ops.autodeploy.moe.default, (x, x, x, x, x))
    assert _prefill_buckets(cfg, gm, info, cache) == []
    with pytest.raises(ValueError, match="cuda_graph_prefill_tokens must be >= 0"):
        CompileModelConfig(cuda_graph_prefill_tokens=-1)
