"""Two NCCL ranks, one per GPU, for ``test_multigpu.py``: ``autodeploy::all_reduce_add_rms_norm``
with its one kernel over symmetric memory against the two ops it replaces (the all-reduce on NCCL,
then ``fused_add_rms_norm``), eagerly at decode and prefill sizes, and replayed from a CUDA graph
with new inputs each time. Every rank returns its findings; rank 0 gathers them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from spawn_ranks import run_on_ranks  # noqa: E402

HIDDEN = 4096
ROWS = [1, 4, 32, 128, 200]  # 128 rows of bf16 fill the 1 MiB buffer exactly; 200 take the two ops (NCCL)
REPLAYS = 5


def run(world: int, dtype: str, timeout: float = 420.0) -> list[dict]:
    """Every rank's findings, in rank order."""
    return run_on_ranks(_fused_vs_two_ops, world, dtype, timeout=timeout)


def _inputs(rows: int, dtype, device, rank: int, seed: int):
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed * 10 + rank)) * 2
    gen = torch.Generator().manual_seed(seed)
    return x.to(device, dtype), torch.randn(rows, HIDDEN, generator=gen).to(device, dtype)


def _compare(got, ref) -> dict:
    (normed, total), (ref_normed, ref_total) = got, ref
    return {
        "sum_equal": torch.equal(total, ref_total),
        "sum_rel_err": float((total.float() - ref_total.float()).norm() / ref_total.float().norm()),
        "normed_rel_err": float((normed.float() - ref_normed.float()).norm() / ref_normed.float().norm()),
    }


def _fused_vs_two_ops(rank: int, world: int, device: torch.device, dtype: str) -> dict:
    from autodeploy.distributed import all_reduce_norm
    from autodeploy.distributed.all_reduce_norm import ONE_KERNEL, OneKernel, enable_one_kernel

    dtype = getattr(torch, dtype)
    ops = torch.ops.autodeploy
    group = ",".join(str(r) for r in range(world))
    found = {"groups": enable_one_kernel([group], device, 1 << 20, HIDDEN, dtype)}
    calls = {"kernel": 0}
    original = OneKernel.__call__

    def counted(self, *args):
        calls["kernel"] += 1
        return original(self, *args)

    all_reduce_norm.OneKernel.__call__ = counted
    weight = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    try:
        # eager, decode and prefill sizes, each three times back to back (the buffer is reused)
        found["eager"] = []
        for rows in ROWS:
            for seed in range(3):
                x, residual = _inputs(rows, dtype, device, rank, seed)
                before = calls["kernel"]
                got = ops.all_reduce_add_rms_norm(x, residual, weight, 1e-5, group)
                took_kernel = calls["kernel"] > before
                ref = ops.fused_add_rms_norm(ops.all_reduce(x, group), residual, weight, 1e-5)
                found["eager"].append({"rows": rows, "kernel": took_kernel, **_compare(got, ref)})
        # a CUDA graph of three chained fused calls (a layer's attention and MLP boundaries and the
        # next), replayed with new inputs copied into its static ones
        x_in, r_in = _inputs(4, dtype, device, rank, 100)
        static_x, static_r = x_in.clone(), r_in.clone()

        def chain(x, r):
            n1, s1 = ops.all_reduce_add_rms_norm(x, r, weight, 1e-5, group)
            n2, s2 = ops.all_reduce_add_rms_norm(n1 * 0.5, s1, weight, 1e-5, group)
            return ops.all_reduce_add_rms_norm(n2 - x, s2, weight, 1e-5, group)

        def chain_two_ops(x, r):
            def step(y, res):
                return ops.fused_add_rms_norm(ops.all_reduce(y, group), res, weight, 1e-5)
            n1, s1 = step(x, r)
            n2, s2 = step(n1 * 0.5, s1)
            return step(n2 - x, s2)

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (Triton compiles here, not under capture)
                chain(static_x, static_r)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = chain(static_x, static_r)
        before = calls["kernel"]
        found["replays"] = []
        for i in range(REPLAYS):
            x, residual = _inputs(4, dtype, device, rank, 200 + i)
            static_x.copy_(x)
            static_r.copy_(residual)
            graph.replay()
            got = tuple(t.clone() for t in static_out)
            found["replays"].append(_compare(got, chain_two_ops(x, residual)))
        torch.cuda.synchronize(device)
        found["kernel_calls_in_replays"] = calls["kernel"] - before  # 0: replays launch no Python
    finally:
        all_reduce_norm.OneKernel.__call__ = original
        ONE_KERNEL.clear()
    return found
