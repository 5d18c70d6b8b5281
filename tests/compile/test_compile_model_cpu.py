"""compile_model on the CPU: config validation, torch-simple, torch-compile, and the CUDA-graph
backends falling back to torch-simple. (GPU replay tests: tests/gpu/test_compile_model.py.)"""

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from toy_lm import CACHE_NAMES, apply_compile, rel, run_both, toy_graph  # noqa: E402

from autodeploy.compile import CudaGraphRunner, default_batch_sizes, placeholder_names  # noqa: E402
from autodeploy.compile.cudagraph import _Graph, decode_pad_inputs  # noqa: E402
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
        for bs in sorted(self.batch_sizes, reverse=True):
            g = _Graph(bs, {**decode_pad_inputs(bs, example), **static})
            g.output = self.model(**g.inputs)

            def replay(g=g):
                g.output.copy_(self.model(**g.inputs))

            g.graph = _RerunGraph(replay)
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
