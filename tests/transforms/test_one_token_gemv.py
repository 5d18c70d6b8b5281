"""one_token_gemv: on a CUDA build the graph's 16-bit linears become ``autodeploy::linear``.

On the CPU the op is ``F.linear`` (the GEMV is a CUDA kernel: tests/custom_ops/test_gemv_interpret.py
runs it in the Triton interpreter, tests/gpu/test_gemv_gpu.py on the GPU), so the graph after the
transform must give exactly the logits of the graph before; a CPU build leaves the graph alone.
"""

import copy

import torch

from hf_zoo import FakeFactory, build_hf_model, export, run_pipeline, sample_inputs

from autodeploy.transforms.interface import BuildContext
from autodeploy.transforms.optimizer import InferenceOptimizer

GEMV = {"one_token_gemv": {"stage": "post_load_fusion"}}
LINEAR, OP = "aten.linear.default", "autodeploy.linear.default"


def _count(gm, target):
    return sum(str(n.target) == target for n in gm.graph.nodes if n.op == "call_function")


def _apply(gm, config, device):
    optimizer = InferenceOptimizer(GEMV)
    gm = optimizer(BuildContext(factory=FakeFactory(config), device=torch.device(device)), gm)
    return gm, optimizer.report[0]


def test_cuda_build_swaps_every_16bit_linear_and_keeps_the_logits():
    hf = build_hf_model("llama").to(torch.bfloat16)
    fused = {n: {"stage": "post_load_fusion"} for n in ("fuse_parallel_linears", "gather_last_token_logits")}
    gm, _ = run_pipeline(export(hf), hf.config)
    gm, _ = run_pipeline(gm, hf.config, fused)
    before = copy.deepcopy(gm)
    linears = _count(before, LINEAR)
    assert linears >= 5  # q/k/v, o, gate/up, down per layer and the head
    gm, record = _apply(gm, hf.config, "cuda")
    assert record.num_matches == linears and _count(gm, LINEAR) == 0 and _count(gm, OP) == linears
    for batch, seq in [(1, 1), (2, 5)]:
        ids, pos = sample_inputs(batch, seq)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids, pos), before(ids, pos), rtol=0, atol=0)


def test_cpu_build_and_fp32_weights_are_left_alone():
    hf = build_hf_model("llama")
    gm, _ = run_pipeline(export(hf), hf.config)
    linears = _count(gm, LINEAR)
    gm, record = _apply(gm, hf.config, "cpu")
    assert record.num_matches == 0 and "CUDA" in record.note and _count(gm, LINEAR) == linears
    gm, record = _apply(gm, hf.config, "cuda")  # fp32 weights: cuBLAS stays
    assert record.num_matches == 0 and _count(gm, LINEAR) == linears


def test_op_on_the_cpu_is_f_linear():
    import autodeploy.custom_ops.linear  # noqa: F401

    x, w, b = torch.randn(1, 3, 16), torch.randn(8, 16), torch.randn(8)
    for args in ((x, w, b), (x[:, :1], w, None)):
        torch.testing.assert_close(torch.ops.autodeploy.linear(*args), torch.nn.functional.linear(*args),
                                   rtol=0, atol=0)
