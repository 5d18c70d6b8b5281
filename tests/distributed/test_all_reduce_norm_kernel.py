"""The one-kernel all-reduce + add + RMSNorm (``all_reduce_norm_kernel.py``) in Triton's interpreter,
with real ranks: one process per rank, each mapping every rank's buffer and signal pad from shared
files, as symmetric memory maps the peers' on a GPU. It checks the kernel's logic (the rows each
program copies and reads, the barrier's flags across processes, the sums and the norm); not the
memory ordering of real GPUs (tests/gpu/test_multigpu.py). A last test compiles it with the real
compiler for sm_90 (no GPU needed) and checks its flags' memory semantics in the PTX.

The interpreter rounds float32 to bfloat16 by truncation (a GPU rounds to nearest), so bfloat16 is
checked within a tolerance; float32 bit for bit on the sum.
"""

from __future__ import annotations

import io
import multiprocessing
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU", allow_module_level=True)
pytest.importorskip("triton")

from autodeploy.custom_ops.add_rms_norm import fused_add_rms_norm_reference  # noqa: E402

BUFFER_BYTES, PAD_BYTES = 1 << 16, 4096
ROUNDS = 3  # calls back to back, each with other values: a stale or early read would show


def _inputs(rows: int, hidden: int, dtype: torch.dtype, rank: int, round_: int):
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(100 * round_ + rank)) * (round_ + 1)
    gen = torch.Generator().manual_seed(7 + round_)
    residual, weight = torch.randn(rows, hidden, generator=gen), torch.randn(hidden, generator=gen)
    return x.to(dtype), residual.to(dtype), weight.to(dtype)


def _rank(rank, world, folder, rows, hidden, dtype, max_programs, results):
    from autodeploy.distributed.all_reduce_norm_kernel import all_reduce_add_rms_norm

    try:
        buffers = [torch.from_file(f"{folder}/buffer{r}", shared=True, size=BUFFER_BYTES, dtype=torch.uint8) for r in range(world)]
        pads = [torch.from_file(f"{folder}/pad{r}", shared=True, size=PAD_BYTES, dtype=torch.uint8) for r in range(world)]
        buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
        pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)
        outs = []
        for round_ in range(ROUNDS):
            x, residual, weight = _inputs(rows, hidden, dtype, rank, round_)
            outs.append(all_reduce_add_rms_norm(x, residual, weight, 1e-5, buffer_ptrs, pad_ptrs, rank, world, max_programs))
        payload = io.BytesIO()
        torch.save((rank, outs), payload)
        results.put(payload.getvalue())
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put(f"rank {rank}: {type(e).__name__}: {e}")


def _run(tmp_path, world, rows, hidden, dtype, max_programs):
    for r in range(world):
        (tmp_path / f"buffer{r}").write_bytes(bytes(BUFFER_BYTES))
        (tmp_path / f"pad{r}").write_bytes(bytes(PAD_BYTES))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, str(tmp_path), rows, hidden, dtype, max_programs, results))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        found = [results.get(timeout=300) for _ in range(world)]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    errors = [f for f in found if isinstance(f, str)]
    assert not errors, errors
    outs = dict(torch.load(io.BytesIO(f)) for f in found)
    pads = [torch.from_file(str(tmp_path / f"pad{r}"), shared=False, size=PAD_BYTES, dtype=torch.uint8) for r in range(world)]
    return [outs[r] for r in range(world)], pads


@pytest.mark.parametrize("world,rows,hidden,dtype,max_programs", [
    (2, 5, 48, torch.float32, 64),  # one program per row
    (3, 7, 40, torch.float32, 3),  # more rows than programs: each program loops over its rows
    (2, 1, 64, torch.bfloat16, 64),  # a batch-1 decode step
    (2, 6, 96, torch.bfloat16, 4),
])
def test_kernel_equals_the_all_reduce_then_add_norm(tmp_path, world, rows, hidden, dtype, max_programs):
    outs, pads = _run(tmp_path, world, rows, hidden, dtype, max_programs)
    for round_ in range(ROUNDS):
        parts = [_inputs(rows, hidden, dtype, r, round_) for r in range(world)]
        reduced = sum(x.float() for x, _, _ in parts).to(dtype)  # the rank sum, in fp32 in rank order
        ref_normed, ref_total = fused_add_rms_norm_reference(reduced, parts[0][1], parts[0][2], 1e-5)
        for rank in range(world):
            normed, total = outs[rank][round_]
            assert torch.equal(normed, outs[0][round_][0]) and torch.equal(total, outs[0][round_][1])  # every rank alike
            if dtype == torch.float32:
                assert torch.equal(total, ref_total)
                torch.testing.assert_close(normed, ref_normed, rtol=1e-5, atol=1e-5)
            else:  # the interpreter truncates to bfloat16: up to one unit in the last place per rounding
                scale = float(reduced.abs().max() + parts[0][1].abs().max())
                assert float((total.float() - ref_total.float()).abs().max()) <= 2 ** -6 * scale
                assert float((normed.float() - ref_normed.float()).norm() / ref_normed.float().norm()) < 2e-2
    # every flag a rank raised was consumed by its peer: the pads are clean for the next call
    assert all(int(p.count_nonzero()) == 0 for p in pads)


COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from autodeploy.distributed.all_reduce_norm_kernel import _all_reduce_add_rms_norm

found = []
for dtype, block, world, warps in (("bf16", 4096, 2, 16), ("fp32", 8192, 4, 16), ("fp16", 64, 2, 1)):
    signature = {name: f"*{dtype}" for name in ("x_ptr", "r_ptr", "w_ptr", "out_ptr", "sum_ptr")}
    signature.update({"buf_ptrs": "*i64", "pad_ptrs": "*i64", "rows": "i32", "N": "i32", "eps": "fp32",
                      **dict.fromkeys(("s_x", "s_r", "s_o", "s_s"), "i32"),
                      **dict.fromkeys(("RANK", "WORLD", "BLOCK"), "constexpr")})
    source = ASTSource(fn=_all_reduce_add_rms_norm, signature=signature,
                       constexprs={"RANK": world - 1, "WORLD": world, "BLOCK": block})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = kernel.asm["ptx"]
    found.append({"cubin": len(kernel.asm["cubin"]), "world": world,
                  "release": ptx.count("atom.global.release.sys.cas.b32"),
                  "acquire": ptx.count("atom.global.acquire.sys.cas.b32")})
json.dump(found, sys.stdout)
"""


def test_kernel_compiles_for_hopper_with_system_scope_flags():
    """The real compiler (not the interpreter) down to an sm_90 cubin with Triton's own ptxas, no GPU
    needed: each barrier is one release compare-and-swap per peer and one acquire per peer, at
    system scope (visible across GPUs), twice per call."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("triton without its NVIDIA backend binaries")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in json.loads(proc.stdout):
        peers = f["world"] - 1
        assert f["cubin"] > 0 and f["release"] == f["acquire"] == 2 * peers, f
