"""Which all-reduces take the one-shot symmetric-memory path (GPU only; the kernel itself runs in
tests/gpu/test_multigpu.py): the routing, checked here on the CPU with the kernel stubbed."""

from __future__ import annotations

import torch
import torch.distributed as dist

from autodeploy.distributed import collectives


def test_a_dtype_the_kernel_lacks_goes_to_nccl(monkeypatch):
    """torch's one-shot kernel dispatches bfloat16 and float32 only: a float16 model used to send its
    decode-sized all-reduces there and fail on the first one."""
    calls = []

    def kernel(self, x):  # as torch's op: refuses on the host a dtype its dispatch lacks
        if x.dtype == torch.float16:
            raise NotImplementedError("\"one_shot_all_reduce\" not implemented for 'Half'")
        calls.append(("one_shot", x.dtype))
        return x * 2

    monkeypatch.setattr(collectives._SymmBuffers, "all_reduce", kernel)
    symm = collectives._SymmBuffers.__new__(collectives._SymmBuffers)
    symm.dtypes = symm._kernel_dtypes(torch.device("cpu"))
    assert symm.dtypes == {torch.bfloat16, torch.float32}
    calls.clear()

    def nccl(t, op=None, group=None):
        calls.append(("nccl", t.dtype))
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", nccl)
    monkeypatch.setattr(collectives, "get_group", lambda name: None)
    monkeypatch.setitem(collectives._SYMM, "0,1", symm)
    small, large = 64, collectives.SYMM_MAX_BYTES // 2 + 8  # elements of 2 bytes: under and over 1 MiB
    for dtype, numel, path in [(torch.bfloat16, small, "one_shot"), (torch.float32, small, "one_shot"),
                               (torch.float16, small, "nccl"), (torch.bfloat16, large, "nccl"),
                               (torch.bfloat16, 3, "nccl")]:  # 6 bytes: under the kernel's 4-byte alignment
        calls.clear()
        x = torch.ones(numel, dtype=dtype)
        out = collectives.all_reduce(x, "0,1")
        assert calls == [(path, dtype)] and torch.equal(out, x * 2), (dtype, numel)
