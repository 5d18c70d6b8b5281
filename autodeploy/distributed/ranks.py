"""Start, join and stop the ranks of a multi-rank run, and feed the workers each step.

Rank 0 is the process the user started (``launch.py`` or ``LLM(..., world_size=N)``): it holds
the one scheduler and sampler. With no external launcher it spawns ranks 1..N-1 itself; under
torchrun or SLURM those ranks already exist and run ``worker_main`` (``cli.main`` and ``run.run``
send them there). Rank 0 puts the resolved config into the rendezvous store, every rank builds
the same pipeline on its own shard, and each step rank 0 broadcasts the step's packed inputs
(``SequenceInfo.buffer``); the workers run the same forward on them and drop the logits.

Faults: a worker that raises writes its error into the store and exits; one that is killed shows
as a dead process. Rank 0 reports either as ``RankFailure`` naming the rank and its error (gloo
collectives fail at once when a peer dies; a watchdog ends a run stuck in a collective that cannot
notice, e.g. NCCL). A worker whose rank 0 is gone exits on its own.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Optional

import torch
import torch.distributed as dist

from .env import RankEnv, detect

log = logging.getLogger("autodeploy.distributed")

CONFIG_KEY = "config"
ERROR_KEY = "error/{rank}"
DONE_KEY = "done/{rank}"  # a worker has left its process group (rank 0 then leaves its own)
# collectives wait this long; idle workers wait for rank 0's next step inside one
TIMEOUT = datetime.timedelta(hours=int(os.environ.get("AUTODEPLOY_DIST_TIMEOUT_H", "24")))
# how long a watchdog lets rank 0 notice a dead rank by itself before it ends the process
STUCK_GRACE_S = 20.0


class RankFailure(RuntimeError):
    """Another rank of the run died or raised; the run cannot go on."""


def rank_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"args.device={device!r} but no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"rank with local rank {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", local_rank)


def _store(env: RankEnv) -> "dist.Store":
    # under torchrun the agent already serves a store at MASTER_PORT: join it instead of hosting one
    host = env.rank == 0 and not (env.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=host,
                          timeout=datetime.timedelta(seconds=600))
    return dist.PrefixStore("autodeploy", store)


def _init_group(env: RankEnv, store: "dist.Store", device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StepChannel:
    """Rank 0 broadcasts each step's packed inputs; the workers receive them into the same buffer."""

    def __init__(self, device: torch.device):
        self.header = torch.zeros(4, dtype=torch.int64, device=device)  # [go, num_seqs, num_tokens, num_logits]
        # filled on the host and copied without a sync: a copy from pageable memory would wait for
        # the device to finish the step before (the overlap scheduler launches ahead of it)
        on_cuda = torch.device(device).type == "cuda"
        self._host = torch.zeros(4, dtype=torch.int64, pin_memory=on_cuda)
        self._copied = torch.cuda.Event() if on_cuda else None

    def _set_header(self, go: int, num_seqs: int = 0, num_tokens: int = 0, num_logits: int = 0) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # the previous header's copy (done long ago in steady state)
        self._host[0], self._host[1], self._host[2], self._host[3] = go, num_seqs, num_tokens, num_logits
        self.header.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def send(self, info, num_seqs: int, num_tokens: int, num_logits: int) -> None:
        self._set_header(1, num_seqs, num_tokens, num_logits)
        dist.broadcast(self.header, 0)
        dist.broadcast(info.buffer[: info.packed_size(num_seqs, num_tokens, num_logits)], 0)

    def send_stop(self) -> None:
        self._set_header(0)
        dist.broadcast(self.header, 0)

    def receive(self, info):
        """The next step's inputs, or None when rank 0 ends the run."""
        dist.broadcast(self.header, 0)
        go, num_seqs, num_tokens, num_logits = self.header.tolist()
        if not go:
            return None
        dist.broadcast(info.buffer[: info.packed_size(num_seqs, num_tokens, num_logits)], 0)
        return info.views(num_seqs, num_tokens, num_logits)


class Ranks:
    """Rank 0's handle on the other ranks: the step channel, failures, shutdown."""

    def __init__(self, env: RankEnv, store, device: torch.device, procs: list):
        self.env, self.store, self.device, self.procs = env, store, device, procs
        self.channel = StepChannel(device)
        self._failure: Optional[RankFailure] = None
        self._closed = False
        self._busy = 0  # > 0 while rank 0 is inside a step (a collective may block)
        atexit.register(self.shutdown)
        if procs:
            threading.Thread(target=self._watch, name="autodeploy-rank-watchdog", daemon=True).start()

    @property
    def world_size(self) -> int:
        return self.env.world_size

    # --- steps ---
    def send(self, info, num_seqs: int, num_tokens: int, num_logits: int) -> None:
        self.check()
        self._busy += 1
        try:
            self.channel.send(info, num_seqs, num_tokens, num_logits)
        except RuntimeError as e:
            raise self.failure(e) or e
        finally:
            self._busy -= 1

    @contextlib.contextmanager
    def busy(self):
        """Marks rank 0 as inside a step (its collectives may block on a dead peer)."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    # --- failures ---
    def check(self) -> None:
        if self._failure is not None:
            raise self._failure

    def failure(self, cause: Optional[BaseException] = None, wait_s: float = 3.0) -> Optional[RankFailure]:
        """The failure of another rank, if there is one (waits briefly for a dying rank to show)."""
        deadline = time.monotonic() + wait_s
        while self._failure is None:
            found = self._find_failure()
            if found is not None:
                self._failure = found
                break
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)
        return self._failure

    def _find_failure(self) -> Optional[RankFailure]:
        for rank in range(1, self.world_size):
            key = ERROR_KEY.format(rank=rank)
            try:
                if self.store.check([key]):
                    return RankFailure(f"rank {rank} failed: {self.store.get(key).decode()}")
            except Exception:  # noqa: BLE001 - the store lives in rank 0 or the launcher; a dead store says nothing
                pass
        for rank, proc in enumerate(self.procs, start=1):
            if proc.exitcode not in (None, 0):
                return RankFailure(f"rank {rank} died ({_describe_exit(proc.exitcode)})")
        return None

    def _watch(self) -> None:
        while not self._closed:
            found = self._find_failure()
            if found is not None and not self._closed:
                self._failure = found
                print(f"[autodeploy] {found}", file=sys.stderr, flush=True)
                deadline = time.monotonic() + STUCK_GRACE_S
                while self._busy and not self._closed and time.monotonic() < deadline:
                    time.sleep(0.2)
                if self._busy and not self._closed:
                    # rank 0 is stuck in a collective that cannot notice the dead peer: end the run
                    print("[autodeploy] rank 0 is stuck waiting for it; ending the run", file=sys.stderr, flush=True)
                    self._kill_workers()
                    os._exit(1)
                return
            time.sleep(0.5)

    # --- shutdown ---
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        if self._failure is None:
            try:
                self.channel.send_stop()
            except Exception as e:  # noqa: BLE001 - a worker may be gone already
                log.debug("could not tell the workers to stop: %s", e)
        for proc in self.procs:
            proc.join(timeout=30 if self._failure is None else 1)
        if not self.procs and self._failure is None:  # torchrun/SLURM ranks: not ours to join
            self._wait_workers_left()
        self._kill_workers()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001
                log.debug("destroy_process_group: %s", e)
        from .collectives import reset_groups

        reset_groups()

    def _wait_workers_left(self, timeout_s: float = 30.0) -> None:
        """Until every worker has destroyed its process group, as the spawned ones are joined: rank 0
        does not tear its own down while a worker still finishes the stop broadcast. (It did not end
        a rare abort of the torchrun worker in CI, 'terminate called without an active exception';
        that worker now skips the interpreter's teardown, ``cli.main``.)"""
        keys = [DONE_KEY.format(rank=r) for r in range(1, self.env.world_size)]
        if not keys:
            return
        try:
            self.store.wait(keys, datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001 - a worker gone without a word: nothing left to wait for
            log.debug("workers did not all report leaving: %s", e)

    def _kill_workers(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def start(config: Any) -> Ranks:
    """Rank 0: join the external launcher's ranks or spawn the workers, share ``config`` (the
    resolved experiment config), and set up the process group."""
    from omegaconf import OmegaConf

    world = int(config.args.world_size)
    env = detect()
    procs: list = []
    if env is not None:
        if env.world_size != world:
            raise ValueError(f"args.world_size={world} but the launcher ({env.launcher}) started {env.world_size} ranks")
        if env.rank != 0:
            raise RuntimeError(f"rank {env.rank} must run worker_main, not start the run")
    else:
        env = RankEnv(0, world, 0, "127.0.0.1", _free_port(), "spawn")
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        for rank in range(1, world):
            proc = ctx.Process(target=_spawned_worker, args=(rank, world, env.master_port, os.getpid()),
                               name=f"autodeploy-rank{rank}")
            proc.start()
            procs.append(proc)
    try:
        store = _store(env)
        store.set(CONFIG_KEY, OmegaConf.to_yaml(config, resolve=True))
        device = rank_device(str(config.args.device), env.local_rank)
        _init_group(env, store, device)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    log.info("%d ranks (%s), %s backend", world, env.launcher, dist.get_backend())
    return Ranks(env, store, device, procs)


def worker_main(env: RankEnv) -> None:
    """Ranks 1..N-1: build the same pipeline on this rank's shard, then run rank 0's steps."""
    from omegaconf import OmegaConf

    from ..build import build_engine

    logging.getLogger("autodeploy").setLevel(logging.WARNING)
    faulthandler.enable()  # a fatal signal (an abort in a C++ library) prints the Python stack
    store = _store(env)
    try:
        config = OmegaConf.create(store.get(CONFIG_KEY).decode())
        device = rank_device(str(config.args.device), env.local_rank)
        _init_group(env, store, device)
        if os.environ.get("AUTODEPLOY_TEST_RAISE_ON_RANK") == str(env.rank):  # the fault tests' hook
            raise RuntimeError(f"injected failure on rank {env.rank} (AUTODEPLOY_TEST_RAISE_ON_RANK)")
        built = build_engine(config.args, rank=env.rank, world_size=env.world_size, progress=False)
        serve(built.engine, StepChannel(device))
    except BaseException as e:
        try:
            store.set(ERROR_KEY.format(rank=env.rank), f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        except Exception:  # noqa: BLE001 - rank 0 (and its store) may be gone already
            pass
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        try:
            store.set(DONE_KEY.format(rank=env.rank), "1")
        except Exception:  # noqa: BLE001 - rank 0 (and its store) may be gone already
            pass


def serve(engine, channel: StepChannel) -> None:
    info = engine.cache.info
    while True:
        inputs = channel.receive(info)
        if inputs is None:
            return
        engine.forward(inputs)


def _spawned_worker(rank: int, world: int, port: int, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    env = RankEnv(rank, world, rank, "127.0.0.1", port, "spawn")
    try:
        worker_main(env)
    except BaseException:
        print(f"[autodeploy rank {rank}] {traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.exit(1)


def _exit_with_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)
