"""Process groups and the collective ops that sharding inserts into the graph.

``autodeploy::all_reduce(x, group)`` (sum) and ``autodeploy::all_gather(x, dim, group)`` are
out-of-place custom ops with fake kernels, so sharded graphs still shape-propagate on meta and
re-export. ``group`` names the participating ranks, e.g. ``"0,1"``; every rank creates the same
groups in the same order (``ensure_groups``) before the first forward, as torch.distributed
requires. The size of a group is read from its name, so a plan computed on meta without any
process group (plan-only mode) still gets the right shapes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

_GROUPS: dict[str, "dist.ProcessGroup"] = {}


def group_name(ranks: Sequence[int]) -> str:
    return ",".join(str(int(r)) for r in ranks)


def group_ranks(name: str) -> list[int]:
    return [int(r) for r in name.split(",")]


def ensure_groups(names: Iterable[str]) -> None:
    """Create the process groups named in a sharding plan (collective: every rank, same order)."""
    if not dist.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size()
    for name in sorted(set(names), key=lambda n: (len(n), n)):
        if name in _GROUPS:
            continue
        ranks = group_ranks(name)
        _GROUPS[name] = dist.group.WORLD if ranks == list(range(world)) else dist.new_group(ranks)


def get_group(name: str) -> "dist.ProcessGroup":
    if name not in _GROUPS:
        if not dist.is_initialized():
            raise RuntimeError(f"collective over ranks {name} but torch.distributed is not initialized")
        if group_ranks(name) != list(range(dist.get_world_size())):
            raise RuntimeError(f"process group {name!r} was not created (ensure_groups)")
        _GROUPS[name] = dist.group.WORLD
    return _GROUPS[name]


def reset_groups() -> None:
    from .all_reduce_norm import ONE_KERNEL

    _GROUPS.clear()
    _SYMM.clear()
    ONE_KERNEL.clear()


# ----- low-latency all-reduce for small (decode-sized) messages on GPUs ----------------------------
# A one-shot all-reduce over symmetric memory: every rank copies its input into a buffer its peers
# can read, and each rank sums all of them itself (peer loads over NVLink, no multicast). For a
# decode step's few KB this takes a third of NCCL's latency; large messages (prefill) stay on NCCL.
SYMM_MAX_BYTES = 1 << 20
# the dtypes to try; the torch sources checked dispatch the kernel for bfloat16 and float32 only
SYMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class _SymmBuffers:
    """Two rendezvoused buffers per group, used in turn: a rank rewrites a buffer only after every
    peer has entered the next all-reduce, i.e. finished reading the previous one."""

    def __init__(self, group: "dist.ProcessGroup", device: torch.device, nbytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.buffers = []
        for _ in range(2):
            buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
            symm_mem.rendezvous(buf, self.group_name)
            self.buffers.append(buf)
        self.turn = 0
        self.dtypes = self._kernel_dtypes(device)

    def _kernel_dtypes(self, device: torch.device) -> frozenset:
        """The dtypes the one-shot kernel takes (the others stay on NCCL): each tried once on a small
        tensor. Collective: every rank makes the same calls, and a dtype the kernel lacks fails on
        the host of every rank alike, before any peer is waited for."""
        taken = set()
        for dtype in SYMM_DTYPES:
            try:
                self.all_reduce(torch.ones(8, dtype=dtype, device=device))
                taken.add(dtype)
            except RuntimeError:  # "not implemented for 'Half'" (NotImplementedError is one too)
                pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return frozenset(taken)

    def takes(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.dtype in self.dtypes and nbytes <= SYMM_MAX_BYTES and nbytes % 4 == 0  # the kernel's alignment

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers[self.turn].view(x.dtype)[: x.numel()]
        self.turn ^= 1
        buf.copy_(x.reshape(-1))
        return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self.group_name).view(x.shape)


_SYMM: dict[str, _SymmBuffers] = {}


def enable_low_latency_all_reduce(names: Iterable[str], device: torch.device) -> list[str]:
    """Set up one-shot all-reduces for these groups (collective); returns the groups that got one.
    Not available (no CUDA, an old torch, no peer access) means NCCL, with the reason logged."""
    import logging

    log = logging.getLogger("autodeploy.distributed")
    if device.type != "cuda" or not dist.is_initialized():
        return []
    done = []
    for name in sorted(set(names), key=lambda n: (len(n), n)):
        if name in _SYMM or len(group_ranks(name)) < 2:
            continue
        try:
            symm = _SymmBuffers(get_group(name), device, SYMM_MAX_BYTES)
        except Exception as e:  # noqa: BLE001 - any failure leaves NCCL in place
            log.warning("one-shot all-reduce over ranks %s unavailable (%s: %s); using NCCL", name, type(e).__name__, e)
            continue
        if not symm.dtypes:
            log.warning("one-shot all-reduce over ranks %s takes none of %s; using NCCL", name, SYMM_DTYPES)
            continue
        _SYMM[name] = symm
        done.append(name)
        others = [str(d).removeprefix("torch.") for d in SYMM_DTYPES if d not in symm.dtypes]
        if others:
            log.info("one-shot all-reduce over ranks %s: %s on NCCL (the kernel does not take it)", name, ", ".join(others))
    return done


@torch.library.custom_op("autodeploy::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``."""
    symm = _SYMM.get(group)
    if symm is not None and symm.takes(x):
        return symm.all_reduce(x)
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=get_group(group))
    return out


@all_reduce.register_fake
def _all_reduce_fake(x, group):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("autodeploy::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """The ranks' ``x`` concatenated along ``dim`` in rank order (equal shapes on every rank)."""
    pg = get_group(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(parts, x, group=pg)
    return torch.cat(parts, dim=dim)


@all_gather.register_fake
def _all_gather_fake(x, dim, group):
    shape = list(x.shape)
    shape[dim] = shape[dim] * len(group_ranks(group))
    return x.new_empty(shape)


COLLECTIVE_OPS = (torch.ops.autodeploy.all_reduce.default, torch.ops.autodeploy.all_gather.default)
