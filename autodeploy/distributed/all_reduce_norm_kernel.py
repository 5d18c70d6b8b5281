"""One Triton kernel for all-reduce + residual add + RMSNorm over symmetric memory (imported lazily:
needs triton). The op and its set-up: ``all_reduce_norm.py``.

Every rank holds a buffer its peers can read (``torch.distributed._symmetric_memory``: plain peer
loads over NVLink, no multicast) and one flag per (program, sender) in each rank's signal pad. A
program of the kernel owns a set of rows (the same rows on every rank, the grid is the same):

1. it copies its rows of ``x`` (this rank's partial sum) into this rank's buffer;
2. barrier with the same program on every peer: a release flag on each peer's pad, then it
   consumes each peer's flag on its own pad (acquire), so the peers' rows are in place;
3. it sums the rows of every rank in rank order in fp32 (the same order, hence the same bits, on
   every rank), rounds the sum to the dtype (what the all-reduce op returns), adds the residual and
   rounds again (the eager ``x + residual``), and normalizes as ``fused_kernels._rms_norm`` does;
4. barrier again: no peer reads this rank's rows any more, so the next call may overwrite them.

A flag is set by compare-and-swap 0 -> 1 and consumed 1 -> 0: a rank that runs ahead waits until
its previous flag was consumed, so flags never pile up and the pads are zero between calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _barrier(pad_ptrs, slot, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Program ``slot`` meets the same program of every peer (the pads: int32 [slots, WORLD])."""
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            pad = tl.load(pad_ptrs + peer).to(tl.pointer_type(tl.int32))
            while tl.atomic_cas(pad + slot * WORLD + RANK, 0, 1, sem="release", scope="sys") != 0:
                pass
    own = tl.load(pad_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            while tl.atomic_cas(own + slot * WORLD + peer, 1, 0, sem="acquire", scope="sys") != 1:
                pass


@triton.jit
def _all_reduce_add_rms_norm(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, buf_ptrs, pad_ptrs, rows, N, eps, s_x, s_r, s_o, s_s,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dtype = x_ptr.dtype.element_ty
    own = tl.load(buf_ptrs + RANK).to(tl.pointer_type(dtype))
    for row in range(pid, rows, programs):
        x = tl.load(x_ptr + row * s_x + offs, mask=mask)
        tl.store(own + row * N + offs, x, mask=mask)
    tl.debug_barrier()  # every thread's stores happen before the flag that publishes them
    _barrier(pad_ptrs, pid, RANK, WORLD)
    tl.debug_barrier()
    for row in range(pid, rows, programs):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            src = tl.load(buf_ptrs + peer).to(tl.pointer_type(dtype))
            # .cg: from L2 (the owner's, over NVLink), never an L1 line from before the barrier
            acc += tl.load(src + row * N + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        reduced = acc.to(dtype)
        r = tl.load(r_ptr + row * s_r + offs, mask=mask, other=0.0)
        total = (reduced.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row * s_s + offs, total, mask=mask)
        x32 = total.to(tl.float32)
        variance = tl.sum(x32 * x32, axis=0) / N
        normed = (x32 * (1.0 / tl.sqrt(variance + eps))).to(dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        out = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * s_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # this program's reads are done before it tells the peers so
    _barrier(pad_ptrs, pid, RANK, WORLD)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    buffer_ptrs: torch.Tensor, pad_ptrs: torch.Tensor, rank: int, world: int, max_programs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(sum_ranks(x) + residual), sum_ranks(x) + residual)``; ``buffer_ptrs`` /
    ``pad_ptrs``: int64 tensors on the device with every rank's buffer (room for ``x``) and signal
    pad address, in rank order; ``max_programs``: the programs the pads have flags for."""
    N = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty_like(x, memory_format=torch.contiguous_format)
    x2, r2 = _rows(x), _rows(residual)
    rows = x2.shape[0]
    if rows == 0:
        return out, total
    o2, s2 = out.view(-1, N), total.view(-1, N)
    block = triton.next_power_of_2(N)
    _all_reduce_add_rms_norm[(min(rows, max_programs),)](
        x2, r2, weight.contiguous(), o2, s2, buffer_ptrs, pad_ptrs, rows, N, float(eps),
        x2.stride(0), r2.stride(0), o2.stride(0), s2.stride(0),
        RANK=rank, WORLD=world, BLOCK=block, num_warps=max(1, min(16, block // 256)),
    )
    return out, total
