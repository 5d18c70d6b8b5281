"""Host time per step of the step channel alone (no model): rank 0 packs a decode batch
(``SequenceInfo.build``) and sends it, each worker receives it and views its inputs, for many
steps; prints each rank's mean and median microseconds per step.

    python scripts/step_channel_bench.py [--world 2] [--batch 1 32] [--steps 3000] [--device cpu]

Works with the channel before issue 25 too (``StepChannel(device)``: a header broadcast, then the
inputs) so both can be timed on the same machine: run it from a checkout of each.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import multiprocessing
import os
import socket
import statistics
import time


def _rank(rank: int, world: int, port: int, args, results) -> None:
    import torch
    import torch.distributed as dist

    from autodeploy.distributed.ranks import StepChannel
    from autodeploy.runtime.sequence_info import SequenceInfo

    torch.set_num_threads(1)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    max_batch, pages = max(args.batch), args.pages
    info = SequenceInfo(max_batch, 8192, pages, device)
    one_message = len(inspect.signature(StepChannel.__init__).parameters) == 3  # (self, device, size)
    channel = StepChannel(device, info.message_size) if one_message else StepChannel(device)
    found = {}
    for batch in args.batch:
        times = []
        for step in range(args.steps + args.warmup):
            t0 = time.perf_counter()
            if rank == 0:
                info.build([[step % 1000]] * batch, [100 + step % 500] * batch,
                           [list(range(1 + b * pages, 1 + b * pages + 8)) for b in range(batch)], list(range(1, batch + 1)))
                channel.send(info, batch, batch, batch)
            else:
                got = channel.receive(info)
                inputs = got[1] if one_message else got
                assert inputs.num_seqs == batch
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        found[batch] = (statistics.fmean(times) * 1e6, statistics.median(times) * 1e6)
    results.put((rank, found))
    if rank == 0:
        channel.send_stop()
    else:
        channel.receive(info)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--pages", type=int, default=32, help="KV pages per sequence (max_seq_len / page size)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, args, results)) for r in range(args.world)]
    for p in procs:
        p.start()
    found = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
    from autodeploy.distributed import ranks

    kind = "one message" if len(inspect.signature(ranks.StepChannel.__init__).parameters) == 3 else "header + inputs"
    print(f"step channel ({kind}), {args.device}, world {args.world}, {args.steps} steps: us per step, mean / median")
    for batch in args.batch:
        cells = "  ".join(f"rank {r}: {found[r][batch][0]:7.1f} / {found[r][batch][1]:7.1f}" for r in sorted(found))
        print(f"  batch {batch:3d}  {cells}")


if __name__ == "__main__":
    main()
