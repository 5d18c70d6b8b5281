"""Spawn ``world`` ranks (NCCL, one per GPU; or gloo on the CPU), run ``check(rank, world, device,
*args)`` on each, and return every rank's findings in rank order (rank 0 gathers them; a rank's
traceback is the error). ``check`` must be a module-level function, so the spawned ranks can import
it. Used by the CPU sharding cases (``rank_cases.py``) and the GPU tests (``tests/gpu/*_ranks.py``)."""

from __future__ import annotations

import io
import multiprocessing
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable

import torch


def run_on_ranks(check: Callable[..., Any], world: int, *args: Any, timeout: float | None = 420.0,
                 device_type: str = "cuda") -> list[Any]:
    """``timeout``: seconds to wait for rank 0's findings (None: as long as the ranks run)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(check, r, world, port, device_type, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        payload = results.get(timeout=timeout)  # rank 0's: every rank's findings, or its traceback
    except queue_mod.Empty:
        payload = f"no result within {timeout} s"
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    if isinstance(payload, str):
        raise RuntimeError(f"ranks failed: {[(r, p.exitcode) for r, p in enumerate(procs)]}\n{payload}")
    return torch.load(io.BytesIO(payload), weights_only=False)


def _rank_main(check, rank: int, world: int, port: int, device_type: str, args: tuple, results) -> None:
    import torch.distributed as dist

    from autodeploy.distributed.env import RankEnv
    from autodeploy.distributed.ranks import _init_group, _store

    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device(device_type)
        env = RankEnv(rank, world, rank, "127.0.0.1", port, "spawn")
        _init_group(env, _store(env), device)
        found = check(rank, world, device, *args)
        everyone = [None] * world
        dist.all_gather_object(everyone, found)
        if rank == 0:
            buffer = io.BytesIO()
            torch.save(everyone, buffer)
            results.put(buffer.getvalue())
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        if rank == 0:
            results.put(traceback.format_exc())
        raise
