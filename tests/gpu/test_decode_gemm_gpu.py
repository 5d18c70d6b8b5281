"""The decode GEMMs on a GPU: the one-token GEMV against cuBLAS in 16 bits, the op's dispatch (one
row -> GEMV, more rows -> F.linear), the ``one_token_gemv`` transform on a bf16 graph on CUDA (a
one-token step runs the GEMV and gives the unfused graph's logits), and CUDA graphs captured with
cuBLASLt from ``cublaslt_min_batch`` sequences up."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autodeploy.models.materialize import move_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transforms"))

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,bias", [(6144, 4096, False), (4096, 14336, True), (1000, 300, True)])
def test_gemv_matches_cublas(dtype, n, k, bias):
    from autodeploy.custom_ops.gemv import CONFIGS, gemv

    x = torch.randn(1, 1, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    ref = F.linear(x, w, b)
    for config in CONFIGS:
        assert _rel(gemv(x, w, b, config), ref) < 5e-3, config


def test_op_takes_the_gemv_for_one_row_only(monkeypatch):
    import autodeploy.custom_ops.gemv as gemv_module
    import autodeploy.custom_ops.linear  # noqa: F401

    calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    one, three = (torch.randn(1, n, 512, device="cuda", dtype=torch.bfloat16) for n in (1, 3))
    assert torch.equal(torch.ops.autodeploy.linear(one, w, None), real(one, w))
    assert torch.equal(torch.ops.autodeploy.linear(three, w, None), F.linear(three, w))
    assert torch.equal(torch.ops.autodeploy.linear(one.float(), w.float(), None), F.linear(one.float(), w.float()))
    assert calls == [one.shape]


def test_transform_on_a_bf16_graph_keeps_the_logits(monkeypatch):
    from hf_zoo import build_hf_model, export, run_pipeline, sample_inputs

    import autodeploy.custom_ops.gemv as gemv_module
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    hf = build_hf_model("llama").to(torch.bfloat16)
    gm, _ = run_pipeline(export(hf), hf.config)  # exported on the CPU (see test_pipeline_backends.py)
    gm = move_graph(gm, "cuda")
    before = copy.deepcopy(gm)
    optimizer = InferenceOptimizer({"one_token_gemv": {"stage": "post_load_fusion"}})
    gm = optimizer(BuildContext(device=torch.device("cuda")), gm)
    assert optimizer.report[0].num_matches > 0
    calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    for batch, seq in [(1, 1), (2, 7)]:
        ids, pos = sample_inputs(batch, seq)
        with torch.no_grad():
            out, ref = gm(ids.cuda(), pos.cuda()), before(ids.cuda(), pos.cuda())
        assert torch.isfinite(out).all() and _rel(out, ref) < 2e-2
        assert bool(calls) == (batch * seq == 1)  # the GEMV ran for the one-token step only
        calls.clear()


def test_graphs_from_cublaslt_min_batch_are_captured_with_cublaslt():
    from autodeploy.compile.cudagraph import CudaGraphRunner

    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    seen = {}

    class Toy(torch.nn.Module):  # a decode step: one row per sequence, token-major output
        def forward(self, input_ids, seq_len):
            seen.setdefault(seq_len.shape[0], set()).add(torch.backends.cuda.preferred_blas_library())
            x = input_ids[0, :, None].to(w.dtype).expand(-1, 256) + 1
            return (x @ w.T).unsqueeze(0)

    before = torch.backends.cuda.preferred_blas_library()
    runner = CudaGraphRunner(Toy(), ["input_ids", "seq_len"], [1, 4], cublaslt_min_batch=4)
    example = {"input_ids": torch.arange(4, device="cuda").view(1, 4),
               "seq_len": torch.ones(4, dtype=torch.int32, device="cuda")}
    runner.capture(example)
    assert runner.captured_sizes == [1, 4]
    lt = torch._C._BlasBackend.Cublaslt
    assert seen[4] == {lt} and lt not in seen[1]
    assert torch.backends.cuda.preferred_blas_library() == before  # restored after the capture
    torch.testing.assert_close(runner(**example), Toy()(**example), rtol=1e-2, atol=1e-2)
