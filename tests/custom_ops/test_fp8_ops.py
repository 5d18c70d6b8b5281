"""FP8 numerics and ops on the CPU: quantize/dequantize against plain loops, ``fp8_linear`` and
``fp8_moe`` against dequantized weights, the ``_scaled_mm`` prefill path (torch runs it on the CPU),
and the Triton kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import os

import pytest
import torch
import torch.nn.functional as F

from autodeploy.custom_ops import fp8_linear as fl
from autodeploy.custom_ops.moe import _moe_dense, _moe_grouped  # noqa: F401  registers the ops

FP8 = torch.float8_e4m3fn
fp8_linear = torch.ops.autodeploy.fp8_linear.default
fp8_moe = torch.ops.autodeploy.fp8_moe.default
moe = torch.ops.autodeploy.moe.default


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _round_fp8(v: float) -> float:
    """Round to the nearest e4m3 value by search (a plain reference, not torch's cast)."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    values = values[torch.isfinite(values)]
    return float(values[(values - v).abs().argmin()])


def test_per_channel_quantization_matches_a_plain_loop():
    w = torch.randn(6, 40, generator=_gen(0)) * torch.logspace(-3, 2, 6).unsqueeze(1)
    q, scale = fl.quantize_per_channel(w)
    assert q.dtype == FP8 and scale.shape == (6,) and scale.dtype == torch.float32
    for r in range(6):
        s = w[r].abs().max().item() / 448
        assert scale[r].item() == pytest.approx(s, rel=1e-6)
        for c in range(0, 40, 7):
            assert q[r, c].float().item() == _round_fp8(w[r, c].item() / scale[r].item())
    # the largest value of each row maps to 448 exactly; dequantized within e4m3's half-step (2^-4)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((6,), 448.0))
    deq = fl.dequantize(q, scale)
    assert ((deq - w).abs() <= w.abs() * 2**-4 + scale.unsqueeze(1) * 2**-9).all()


def test_block_quantization_matches_a_plain_loop_with_partial_blocks():
    w = torch.randn(70, 50, generator=_gen(1))
    q, scale = fl.quantize_blocks(w, (32, 16))
    assert scale.shape == (3, 4)
    deq = fl.dequantize(q, scale, (32, 16))
    for i in range(3):
        for j in range(4):
            block = w[i * 32:(i + 1) * 32, j * 16:(j + 1) * 16]
            s = block.abs().max() / 448
            assert scale[i, j].item() == pytest.approx(s.item(), rel=1e-6)
            expected = (block / s).clamp(-448, 448).to(FP8).float() * s
            torch.testing.assert_close(deq[i * 32:(i + 1) * 32, j * 16:(j + 1) * 16], expected, rtol=1e-6, atol=0)


def test_per_tensor_and_zero_rows_stay_finite():
    w = torch.zeros(4, 8)
    w[1, 3] = -2.0
    q, s = fl.quantize_per_tensor(w)
    assert s.dim() == 0 and torch.equal(fl.dequantize(q, s), w)
    q, s = fl.quantize_per_channel(w)
    assert torch.isfinite(s).all() and torch.equal(fl.dequantize(q, s), w)
    x = torch.zeros(3, 8)
    q, s = fl.quantize_rows(x)
    assert torch.equal(q.float(), x) and torch.isfinite(s).all()


def test_values_past_the_range_saturate():
    # torch's cast makes NaN of what e4m3 cannot hold: the static input scale must clamp first
    x = torch.tensor([[1000.0, -1000.0, 1.0]])
    q, s = fl.quantize_rows(x, torch.tensor(1.0))
    assert q.float().tolist() == [[448.0, -448.0, 1.0]] and s.tolist() == [[1.0]]


@pytest.mark.parametrize("block", [None, [16, 32]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_f_linear_on_dequantized_weights(block, dtype):
    w, x, b = torch.randn(48, 64, generator=_gen(2)), torch.randn(2, 5, 64, generator=_gen(3)), torch.randn(48)
    q, s = fl.quantize_blocks(w, block) if block else fl.quantize_per_channel(w)
    expected = F.linear(x.to(dtype), fl.dequantize(q, s, block).to(dtype), b.to(dtype))
    out = fp8_linear(x.to(dtype), q, s, None, b.to(dtype), block)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_fake_kernel_checks_the_scale_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.zeros(48, 64, dtype=FP8)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert fp8_linear(torch.empty(3, 64), q, torch.empty(48)).shape == (3, 48)
        with pytest.raises(ValueError, match=r"needs weight_scale \[2, 2\], got \[48\]"):
            fp8_linear(torch.empty(3, 64), q, torch.empty(48), None, None, [32, 32])


@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_prefill_path_is_close_to_the_reference(static):
    # the CUDA prefill path rounds the activations to FP8 too; torch's _scaled_mm runs on the CPU
    w, x = torch.randn(64, 128, generator=_gen(4)), torch.randn(100, 128, generator=_gen(5)).bfloat16()
    q, s = fl.quantize_per_channel(w)
    input_scale = x.float().abs().max() / 448 if static else None
    ref = fp8_linear(x.float(), q, s)
    out = fl.scaled_mm_linear(x, q, s, input_scale, None)
    assert out.dtype == torch.bfloat16 and out.shape == (100, 64)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.04, rel  # e4m3 activations: ~2^-5 relative per element, averaged in the dot products
    # per token: rounding the activations is what differs, so the same rounding done by hand agrees
    xq, xs = fl.quantize_rows(x, input_scale)
    by_hand = F.linear(fl.dequantize(xq, xs.squeeze(1)), fl.dequantize(q, s))
    torch.testing.assert_close(out.float(), by_hand, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("tokens", [5, 80])  # the dense (<= 64) and grouped paths
@pytest.mark.parametrize("block", [None, [16, 16]])
def test_fp8_moe_is_moe_on_dequantized_experts(tokens, block):
    E, Hd, I, k = 4, 32, 48, 2
    gu, dn = torch.randn(E, 2 * I, Hd, generator=_gen(6)), torch.randn(E, Hd, I, generator=_gen(7))
    quant = (lambda w: fl.quantize_blocks(w, block)) if block else fl.quantize_per_channel
    (qgu, sgu), (qdn, sdn) = quant(gu), quant(dn)
    x = torch.randn(tokens, Hd, generator=_gen(8))
    ids = torch.randint(0, E + 1, (tokens, k), generator=_gen(9))  # E: an expert-parallel sentinel
    weights = torch.rand(tokens, k, generator=_gen(10))
    expected = moe(x, ids, weights, fl.dequantize(qgu, sgu, block), fl.dequantize(qdn, sdn, block))
    torch.testing.assert_close(fp8_moe(x, ids, weights, qgu, qdn, sgu, sdn, block), expected, rtol=1e-6, atol=1e-6)


# ---- the Triton kernels in the interpreter ----------------------------------------------------

triton_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="needs triton (the interpreter on the CPU)")


@triton_only
@pytest.mark.parametrize("block", [None, (32, 32)])
@pytest.mark.parametrize("rows,dtype", [(1, torch.bfloat16), (1, torch.float16), (3, torch.float16),
                                        (33, torch.float16), (70, torch.float16)])
def test_triton_fp8_mm_matches_the_reference(rows, dtype, block):
    # tl.dot on bf16 tiles is wrong in the interpreter (numpy has no bf16): more than one row is
    # checked in fp16 here, bf16 on the GPU (tests/gpu/test_fp8_gpu.py)
    pytest.importorskip("triton")
    from autodeploy.custom_ops.fp8_kernels import fp8_mm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(72, 96, generator=_gen(11))
    q, s = fl.quantize_blocks(w, block) if block else fl.quantize_per_channel(w)
    x = torch.randn(rows, 96, generator=_gen(12)).to(dtype)
    bias = torch.randn(72, generator=_gen(13)).to(dtype)
    ref = F.linear(x.float(), fl.dequantize(q, s, block), bias.float())
    out = fp8_mm(x.to(device), q.to(device), s.to(device), bias.to(device), block).cpu()
    assert out.dtype == dtype and out.shape == (rows, 72)
    assert ((out.float() - ref).abs().max() / ref.abs().max()) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@triton_only
def test_triton_quantize_rows_matches_torch():
    pytest.importorskip("triton")
    from autodeploy.custom_ops.fp8_kernels import quantize_rows

    x = torch.randn(7, 300, generator=_gen(14)).bfloat16()
    x[3] = 0
    q, s = quantize_rows(x)
    q_ref, s_ref = fl.quantize_rows(x)
    assert torch.equal(s, s_ref)
    a, b = q.float(), q_ref.float()
    same = a == b
    if os.environ.get("TRITON_INTERPRET") == "1":
        # the interpreter's fp32 -> e4m3 cast drops the carry when rounding up to the next power of
        # two (126.5 -> 64 instead of 128); a GPU rounds like torch (tests/gpu/test_fp8_gpu.py)
        power = b.abs() == 2.0 ** torch.floor(torch.log2(b.abs().clamp(min=1e-30)))
        same |= power & (a == b / 2)
    assert same.all()


@triton_only
@pytest.mark.parametrize("block", [None, (32, 32)])
@pytest.mark.parametrize("rows,dtype", [(1, torch.bfloat16), (20, torch.float16)])
@pytest.mark.parametrize("split", [1, 2, 3, 8])
def test_triton_fp8_mm_split_k_adds_up(rows, dtype, block, split):
    # K split over programs: fp32 partial sums added by one reduction (and the bias once)
    pytest.importorskip("triton")
    from autodeploy.custom_ops.fp8_kernels import fp8_mm

    w = torch.randn(40, 96, generator=_gen(15))
    q, s = fl.quantize_blocks(w, block) if block else fl.quantize_per_channel(w)
    x = torch.randn(rows, 96, generator=_gen(16)).to(dtype)
    bias = torch.randn(40, generator=_gen(17)).to(dtype)
    ref = F.linear(x.float(), fl.dequantize(q, s, block), bias.float())
    out = fp8_mm(x, q, s, bias, block, config=(16, 32, 4, 1, split))
    assert out.dtype == dtype and ((out.float() - ref).abs().max() / ref.abs().max()) < 1e-2


_COMPILE_SM90 = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from autodeploy.custom_ops import fp8_kernels as fk

target = GPUTarget("cuda", 90, 32)
names = ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "M", "N", "K", "k_split", "s_xm", "s_wn", "s_sn", "s_ym", "s_yk"]
cases = [(dict(BLOCK_M=1, DOT=False), fk.GEMV_CONFIGS[0]), (dict(BLOCK_M=32, DOT=True), fk.DOT_CONFIGS[2]),
         (dict(BLOCK_M=fk.LARGE_M_CONFIG[0], DOT=True), fk.LARGE_M_CONFIG[1:])]
for (cx, (bn, bk, warps, stages, _)), dtype, scale in itertools.product(cases, ("bf16", "fp16"), ((0, 0), (128, 128))):
    block_k = min(bk, scale[1]) if scale[1] and cx["DOT"] else bk
    consts = {**cx, "BLOCK_N": bn, "BLOCK_K": block_k, "SCALE_BN": scale[0], "SCALE_BK": scale[1], "HAS_BIAS": True}
    types = [f"*{dtype}", "*fp8e4nv", "*fp32", f"*{dtype}", f"*{dtype}"] + ["i32"] * 9
    signature = {**dict(zip(names, types)), **dict.fromkeys(consts, "constexpr")}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in ("M", "s_sn")}
    kernel = triton.compile(ASTSource(fk._fp8_mm, signature, constexprs=consts, attrs=attrs), target=target,
                            options={"num_warps": warps, "num_stages": stages})
    assert "ld.global.v4" in kernel.asm["ptx"] or "cp.async" in kernel.asm["ptx"], (cx, "no vectorized weight loads")
signature = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "K": "i32", "s_xm": "i32", "s_qm": "i32",
             "fp8_max": "fp32", "MIN_SCALE": "constexpr", "BLOCK": "constexpr"}
kernel = triton.compile(ASTSource(fk._quantize_rows, signature, constexprs={"MIN_SCALE": 1e-12, "BLOCK": 4096}),
                        target=target, options={"num_warps": 8})
assert "div.rn.f32" in kernel.asm["ptx"]
print("compiled")
"""


def test_triton_kernels_compile_for_hopper():
    # the interpreter runs the kernels' math but never compiles them: Triton compiles them here for
    # sm_90 (ptxas ships with the wheel), so a construct the GPU cannot lower fails on the CPU too
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("this triton wheel has no ptxas")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
