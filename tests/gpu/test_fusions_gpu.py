"""The fusions on a GPU: the ops' Triton kernels against their reference math, each fusion
transform in bf16 on CUDA against the unfused graph, and the benchmark's roofline fields.
(End to end with every fusion, triton attention and CUDA graphs: test_pipeline_backends.py.)"""

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from autodeploy.models.materialize import move_graph
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transforms"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (3, 17, 4096), (5, 100)])
def test_norm_kernels_match_reference(dtype, shape):
    import autodeploy.custom_ops.add_rms_norm  # noqa: F401
    from autodeploy.custom_ops.rms_norm import rms_norm_reference

    ops = torch.ops.autodeploy
    x, r = torch.randn(shape, device="cuda", dtype=dtype) * 3, torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(shape[-1], device="cuda", dtype=dtype)
    normed, total = ops.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(total, x + r, rtol=0, atol=0)  # the rounded sum, exactly
    ref = rms_norm_reference(x + r, w, 1e-5)
    assert normed.dtype == ref.dtype and _rel(normed, ref) < (1e-6 if dtype == torch.float32 else 8e-3)
    assert _rel(ops.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)) < (1e-6 if dtype == torch.float32 else 8e-3)
    strided = torch.randn(shape[0], 2 * shape[-1], device="cuda", dtype=dtype)[:, : shape[-1]]
    assert _rel(ops.rms_norm(strided, w, 1e-6), rms_norm_reference(strided, w, 1e-6)) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_kernel_matches_reference(dtype):
    import autodeploy.custom_ops.silu_mul  # noqa: F401

    x = torch.randn(7, 2 * 14336, device="cuda", dtype=dtype) * 2
    gate, up = x.chunk(2, dim=-1)
    out = torch.ops.autodeploy.silu_mul(x)
    assert _rel(out, F.silu(gate) * up) < (1e-6 if dtype == torch.float32 else 8e-3)
    sliced = torch.randn(3, 5, 3 * 64, device="cuda", dtype=dtype)[..., 64:]
    gate, up = sliced.chunk(2, dim=-1)
    assert _rel(torch.ops.autodeploy.silu_mul(sliced), F.silu(gate) * up) < 1e-2


FUSIONS = ["fuse_add_rms_norm", "fuse_parallel_linears", "fuse_silu_mul", "gather_last_token_logits"]


def _no_match_details(fusion, report, gm):
    """For fuse_silu_mul: what fuse_parallel_linears did and what surrounds each silu."""
    if fusion != "fuse_silu_mul":
        return f"{fusion}: {report[fusion]}"
    from autodeploy.transforms.library.fuse_silu_mul import describe_silu_sites

    lin = report["fuse_parallel_linears"]
    return (f"fuse_silu_mul: 0 matches; fuse_parallel_linears: {lin.num_matches} matches, note={lin.note!r}, "
            f"skipped={lin.skipped}, error={lin.error}; silu sites:\n{describe_silu_sites(gm)}")


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_on_cuda_in_bf16(fusion):
    from hf_zoo import build_hf_model, export, run_pipeline, sample_inputs

    hf = build_hf_model("llama").to(torch.bfloat16)
    gm, _ = run_pipeline(export(hf), hf.config)  # exported on the CPU (see test_pipeline_backends.py)
    gm = move_graph(gm, "cuda")
    unfused = copy.deepcopy(gm)
    needs = ["fuse_parallel_linears"] if fusion == "fuse_silu_mul" else []  # silu_mul reads the fused gate/up
    transforms = {name: {"stage": "post_load_fusion"} for name in needs + [fusion]}
    fused, report = run_pipeline(gm, hf.config, transforms)
    assert report[fusion].num_matches > 0, _no_match_details(fusion, report, fused)
    ids, pos = sample_inputs(3, 33)
    with torch.no_grad():
        ref = unfused(ids.cuda(), pos.cuda())[:, -1:]
        out = fused(ids.cuda(), pos.cuda())[:, -1:]
    assert torch.isfinite(out).all() and _rel(out, ref) < 2e-2


def test_benchmark_roofline_on_cuda():
    from tiny_deployment import build_tiny

    from autodeploy.bench import roofline
    from autodeploy.bench.benchmark import run_benchmark

    dep = build_tiny("tiny_llama", device="cuda", free_mem_ratio=0.05)
    engine = dep.engine()
    bench = SimpleNamespace(bs=2, batch_sizes=[1], isl=16, osl=8, num=1, warmup=1, compare_hf=False)
    result = run_benchmark(engine, bench)
    roof = result["roofline"]
    assert 0.1 < roof["copy_bw_tb_s"] < 20 and 1 < roof["matmul_tflop_s"] < 5000
    assert 1 < roof["matmul_sustained_tflop_s"] < 5000 and roof["prefill_fraction_sustained"] > roof["prefill_fraction"]
    weights, _ = roofline.streamed_weights(engine.model)
    assert roof["weight_gb"] == pytest.approx(weights / 1e9)
    assert 0 < roof["decode_fraction"] and 0 < roof["prefill_fraction"]
    assert result["peak_gpu_mem_gib"] > 0 and result["by_batch_size"]["1"]["roofline"] is not None


def test_prompt_and_mixed_forwards_never_sync_the_host():
    """The cached graph (triton attention, every fusion, eager) runs a prefill and a mixed batch
    under CUDA's sync debug mode set to error: no .item(), no host-read shapes inside the forward."""
    from tiny_deployment import MAX_BATCH_SIZE, MAX_SEQ_LEN, PAGE_SIZE, PIPELINE
    from transformers import AutoModelForCausalLM

    from autodeploy.export.export import export_to_gm
    from autodeploy.models.tiny import ensure_tiny_model
    from autodeploy.runtime.kv_cache import CacheInterface
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    hf = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny_llama"), dtype=torch.bfloat16).eval()
    gm = move_graph(export_to_gm(hf, max_batch_size=MAX_BATCH_SIZE, max_seq_len=MAX_SEQ_LEN), "cuda")
    cache = CacheInterface(MAX_BATCH_SIZE, MAX_SEQ_LEN, None, PAGE_SIZE, "cuda")
    pipeline = {**PIPELINE, "insert_cached_attention": {"stage": "cache_init", "backend": "triton"},
                "resize_kv_cache": {"stage": "cache_init", "free_mem_ratio": 0.05}}
    model = InferenceOptimizer(pipeline)(BuildContext(cache=cache, device=torch.device("cuda")), model=gm)
    batches = [([[1, 5, 9, 22, 41], [7, 8, 9]], [0, 0]), ([[3, 4, 5], [2]], [5, 3])]  # prefills; chunk + decode
    with torch.inference_mode():
        for tokens, input_pos in batches:  # one batch at a time: the inputs are views of one buffer
            inputs = cache.info.build(tokens, input_pos, [[1], [2]], [1, 2])
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                logits = model(**inputs.named_args, **cache.tensors)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert logits.shape[:2] == (1, 2) and torch.isfinite(logits).all()
