"""Who am I in a multi-rank run: the rank environment of an external launcher, or none.

An external launcher starts every rank itself and tells each one its place through environment
variables; we join it instead of spawning ranks:
- torchrun (and anything that sets the same variables): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``;
- SLURM (``srun``, or submitit's SLURM executor with one task per GPU): ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``; the first host of the job is the rendezvous.
A plain ``python launch.py args.world_size=N`` sees neither and spawns N-1 workers (``ranks.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | spawn

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


@functools.cache
def launcher_env() -> RankEnv | None:
    """This process's rank environment, read once (every reader asks here)."""
    return detect()


def serve_if_worker(world_size: int | None = None) -> bool:
    """The one place worker ranks are told apart: a rank > 0 that an external launcher started
    (torchrun runs launch.py in every rank; SLURM, through submitit, runs the job in every task)
    serves rank 0 and returns True. ``world_size``: the job's, when known (a SLURM job of one rank
    started in several tasks has nothing for the others to do)."""
    env = launcher_env()
    if env is None or env.rank == 0:
        return False
    if world_size == 1:
        logging.getLogger("autodeploy").warning("rank %d of a world_size 1 run: nothing to do", env.rank)
    else:
        from .ranks import worker_main  # torch: only a worker pays for it here

        worker_main(env)
    return True


def detect(environ: "dict[str, str] | None" = None) -> RankEnv | None:
    """The rank environment set by an external launcher, or None when there is none."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return RankEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or first_host(nodes),
            # one port per job, so two jobs on one node do not meet at the same rendezvous
            master_port=int(env.get("MASTER_PORT") or 20000 + job % 20000),
            launcher="slurm",
        )
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,07],cpu1`` -> ``gpu03``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        return nodelist
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]
