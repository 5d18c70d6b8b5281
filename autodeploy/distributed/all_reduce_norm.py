"""``autodeploy::all_reduce_add_rms_norm``: the all-reduce of a row-parallel output, the residual add
and the RMSNorm that reads the sum, as one op (``fuse_allreduce_residual_rmsnorm`` puts it in the graph).

``(x, residual, weight, eps, group) -> (rms_norm(all_reduce(x) + residual), all_reduce(x) + residual)``

- Where the one kernel is not set up (the CPU and gloo, ``max_bytes=0``) and for messages larger
  than its buffer (prefill): ``autodeploy::all_reduce`` then ``autodeploy::fused_add_rms_norm``,
  the two ops the graph ran before the fusion (on the CPU the very same bits).
- CUDA, messages up to ``max_bytes`` (decode steps): one Triton kernel over symmetric memory
  (``all_reduce_norm_kernel.py``: peer loads, no multicast). ``enable_one_kernel`` sets it up per
  process group and checks it against the two ops before the group may use it.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.distributed as dist

import autodeploy.custom_ops.add_rms_norm  # noqa: F401  registers torch.ops.autodeploy.fused_add_rms_norm

from .collectives import all_reduce, get_group, group_ranks

log = logging.getLogger("autodeploy.distributed")

ONE_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class OneKernel:
    """A group's symmetric buffer, the peers' buffer and signal-pad addresses, and the launch."""

    def __init__(self, group: "dist.ProcessGroup", device: torch.device, nbytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group.group_name)
        # the peers' tensors lie at the same offset in their allocations as ours
        offset = self.buffer.data_ptr() - self.handle.buffer_ptrs[self.handle.rank]
        self.buffer_ptrs = torch.tensor([p + offset for p in self.handle.buffer_ptrs], dtype=torch.int64, device=device)
        self.pad_ptrs = torch.tensor(list(self.handle.signal_pad_ptrs), dtype=torch.int64, device=device)
        self.rank, self.world = self.handle.rank, self.handle.world_size
        pad_bytes = symm_mem.get_signal_pad_size() if hasattr(symm_mem, "get_signal_pad_size") else self.handle.signal_pad_size
        # one int32 flag per (program, rank); and no more programs than SMs: a program waits for its
        # peer's twin, so all of them must be running at once (more rows: a program takes several)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.max_programs = max(1, min(int(pad_bytes) // 4 // self.world, sms))
        self.max_bytes = nbytes

    def takes(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return (x.device == self.buffer.device and x.dtype in ONE_KERNEL_DTYPES and x.dtype == residual.dtype
                and x.shape == residual.shape and x.numel() * x.element_size() <= self.max_bytes)

    def __call__(self, x, residual, weight, eps):
        from .all_reduce_norm_kernel import all_reduce_add_rms_norm as kernel

        return kernel(x, residual, weight, eps, self.buffer_ptrs, self.pad_ptrs, self.rank, self.world, self.max_programs)


ONE_KERNEL: dict[str, OneKernel] = {}  # by group name; cleared with the groups (collectives.reset_groups)


@torch.library.custom_op("autodeploy::all_reduce_add_rms_norm", mutates_args=())
def all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group: str
) -> tuple[torch.Tensor, torch.Tensor]:
    one = ONE_KERNEL.get(group)
    if one is not None and one.takes(x, residual):
        return one(x, residual, weight, eps)
    return torch.ops.autodeploy.fused_add_rms_norm(all_reduce(x, group), residual, weight, eps)


@all_reduce_add_rms_norm.register_fake
def _all_reduce_add_rms_norm_fake(x, residual, weight, eps, group):
    return torch.ops.autodeploy.fused_add_rms_norm(torch.empty_like(x, memory_format=torch.contiguous_format),
                                                   residual, weight, eps)


def enable_one_kernel(names: Iterable[str], device: torch.device, max_bytes: int, hidden: int,
                      dtype: torch.dtype) -> list[str]:
    """Set up the one kernel for these groups (collective: every rank, same calls); returns the
    groups that got it. Each group's kernel first runs against the two ops it replaces on inputs
    of this hidden size and dtype; one that fails or differs on any rank is not used (logged)."""
    if device.type != "cuda" or max_bytes <= 0 or not dist.is_initialized() or dtype not in ONE_KERNEL_DTYPES:
        return []
    done = []
    for name in sorted(set(names), key=lambda n: (len(n), n)):
        if name in ONE_KERNEL or len(group_ranks(name)) < 2:
            continue
        group = get_group(name)
        try:
            one = OneKernel(group, device, max_bytes)
            error = _check(one, name, device, hidden, dtype)
        except Exception as e:  # noqa: BLE001 - no symmetric memory, no triton, a kernel that fails to compile
            one, error = None, f"{type(e).__name__}: {e}"
        failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.all_reduce(failed, group=group)  # every rank decides alike
        if failed.item():
            log.warning("all-reduce + add + RMSNorm over ranks %s: the one kernel is not used (%s); "
                        "the all-reduce and the add+norm run as two ops", name, error or "it failed on another rank")
            continue
        ONE_KERNEL[name] = one
        done.append(name)
    return done


def _check(one: OneKernel, name: str, device: torch.device, hidden: int, dtype: torch.dtype) -> "str | None":
    """The kernel against ``all_reduce`` + ``fused_add_rms_norm`` on three different rounds of inputs
    (a stale or misread peer buffer shows); the error, or None."""
    rows = max(1, min(3, one.max_bytes // (hidden * dtype.itemsize)))
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the order of the rank sum differs from NCCL's (> 2 ranks)
    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(hidden, generator=gen).to(device, dtype)
    for round_ in range(3):
        residual = torch.randn(rows, hidden, generator=gen).to(device, dtype)
        x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(round_ * 1000 + one.rank)).to(device, dtype)
        normed, total = one(x, residual, weight, 1e-5)
        ref_normed, ref_total = torch.ops.autodeploy.fused_add_rms_norm(all_reduce(x, name), residual, weight, 1e-5)
        for got, ref, what in ((total, ref_total, "sum"), (normed, ref_normed, "normed")):
            err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
            if not err <= tol:
                return f"round {round_}: {what} differs from the two ops by {err:.2e} (relative to max)"
    torch.cuda.synchronize(device)
    return None
