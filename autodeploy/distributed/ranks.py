"""Start, join and stop the ranks of a multi-rank run, and feed the workers each step.

Rank 0 is the process the user started (``launch.py`` or ``LLM(..., world_size=N)``): it holds
the one scheduler and sampler. With no external launcher it spawns ranks 1..N-1 itself; under
torchrun or SLURM those ranks already exist and run ``worker_main`` (``cli.main`` and ``run.run``
send them there). Rank 0 puts the resolved config into the rendezvous store, every rank builds
the same pipeline on its own shard, and each step rank 0 broadcasts the step's packed inputs
(``SequenceInfo.buffer``, its header included: one message for a decode step, ``StepChannel``); the
workers run the same forward on them and drop the logits.

Spawned workers are processes of their own (``python -m autodeploy.distributed.worker``), not
``multiprocessing`` children, so the user's main module is never imported again in them. On the
CPU each spawned rank gets its share of the cores (``OMP_NUM_THREADS``, unless the user set it).

Faults: a worker that raises writes its error into the store and exits; one that is killed shows
as a dead process. Rank 0 watches for both from the moment the workers start: until every worker
has checked in (``ready/<rank>``) it waits in Python and fails at once; later, gloo collectives
fail when a peer dies, and a watchdog ends a run stuck in a collective that cannot notice (NCCL).
Either way rank 0 reports ``RankFailure`` naming the rank and its error. A worker whose rank 0 is
gone exits on its own.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import faulthandler
import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .env import RankEnv, launcher_env

log = logging.getLogger("autodeploy.distributed")

CONFIG_KEY = "config"
ERROR_KEY = "error/{rank}"
ERROR_SEQ_KEY = "error_seq/{rank}"  # the order in which ranks failed: the first is the cause, the others its echoes
READY_KEY = "ready/{rank}"  # a worker has its config and device and joins the group now (value: its CPU threads)
DONE_KEY = "done/{rank}"  # a worker has left its process group (rank 0 then leaves its own)
STEP_TIMES_KEY = "step_times/{rank}/{seq}"  # a worker's StepTimes, the seq-th time rank 0 asked
# collectives wait this long; idle workers wait for rank 0's next step inside one
TIMEOUT = datetime.timedelta(hours=int(os.environ.get("AUTODEPLOY_DIST_TIMEOUT_H", "24")))
# how long a watchdog lets rank 0 notice a dead rank by itself before it ends the process
STUCK_GRACE_S = 20.0
# how long rank 0 waits for every worker to check in (starting Python, importing torch, reaching the store)
STARTUP_TIMEOUT_S = 600.0
TEST_FAULT_ENV = "AUTODEPLOY_TEST_RAISE_ON_RANK"


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
    # the host does not wait for the others here: rank 0 waits for them itself, watching for failures
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=host,
                          timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S), wait_for_workers=False)
    return dist.PrefixStore("autodeploy", store)


def _init_group(env: RankEnv, store: "dist.Store", device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))


def injected_fault(rank: int, phase: str) -> None:
    """The fault tests' hook: ``AUTODEPLOY_TEST_RAISE_ON_RANK=<rank>[@<phase>]`` makes that worker
    fail at ``exit`` (dies before it reaches the store), ``start`` (raises before the process group
    exists) or, without a phase, ``group`` (raises once the group exists)."""
    target, _, at = os.environ.get(TEST_FAULT_ENV, "").partition("@")
    if target != str(rank) or (at or "group") != phase:
        return
    if phase == "exit":
        os._exit(3)
    raise RuntimeError(f"injected failure on rank {rank} ({TEST_FAULT_ENV})")


# ----- CPU threads: each spawned rank gets its share of the cores ----------------------------------


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads_per_rank(world: int) -> "int | None":
    """Threads for each of ``world`` CPU ranks on this machine, or None when the user chose
    (``OMP_NUM_THREADS`` is set): ranks that each take every core slow each other down."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cpu_cores() // world)


def limit_cpu_threads() -> None:
    """torch's intra-op threads as ``OMP_NUM_THREADS`` says (torch reads it at start; this makes it sure)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        torch.set_num_threads(int(value))


class Worker:
    """A rank that rank 0 spawned: its process, with what the watchdog and shutdown ask of it."""

    def __init__(self, rank: int, proc: subprocess.Popen):
        self.rank, self.proc = rank, proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exitcode(self) -> "int | None":
        return self.proc.poll()  # negative: killed by that signal

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def join(self, timeout: "float | None" = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    def terminate(self) -> None:
        if self.is_alive():
            self.proc.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.proc.kill()


def spawn_workers(world: int, port: int, threads: "int | None") -> list[Worker]:
    """Start ranks 1..world-1 as ``python -m autodeploy.distributed.worker`` processes: the same
    interpreter and import path as this one, none of the user's modules."""
    # this process's import path, in its order (the package's root last, for when it came from the cwd)
    path = [p or os.getcwd() for p in sys.path] + [str(Path(__file__).resolve().parents[2])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    workers = []
    for rank in range(1, world):
        cmd = [sys.executable, "-m", "autodeploy.distributed.worker", str(rank), str(world), str(port), str(os.getpid())]
        workers.append(Worker(rank, subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)))
    return workers


class StepChannel:
    """Rank 0 sends each step's packed inputs to the workers in one broadcast of ``size`` int32
    values: the start of ``SequenceInfo.buffer``, its header ``[STEP, B, T, G]`` and the inputs of
    any decode step (``sequence_info.message_size``); a step with more (a prefill) sends the rest
    in a second one. The workers read B, T, G from the header and view the rest in place. Rank 0's
    other messages (stop, report your step times) have the same size and another first value."""

    STOP, STEP, REPORT = 0, 1, 2

    def __init__(self, device: torch.device, size: int):
        self.size = size
        self._control = torch.zeros(size, dtype=torch.int32, device=device)  # rank 0's stop and report messages
        self._checked = False

    def _check(self, info) -> None:
        if not self._checked:
            if info.message_size != self.size:
                raise RuntimeError(f"step channel of {self.size} values, but the sequence buffer's message has "
                                   f"{info.message_size} (the two sizes must come from the same args)")
            self._checked = True

    def send(self, info, num_seqs: int, num_tokens: int, num_logits: int) -> None:
        self._check(info)
        end = info.packed_size(num_seqs, num_tokens, num_logits)
        dist.broadcast(info.buffer[: self.size], 0)
        if end > self.size:
            dist.broadcast(info.buffer[self.size: end], 0)

    def send_control(self, code: int, arg: int = 0) -> None:
        self._control[0], self._control[1] = code, arg
        dist.broadcast(self._control, 0)

    def send_stop(self) -> None:
        self.send_control(self.STOP)

    def receive(self, info) -> tuple[int, Any]:
        """``(STEP, the step's inputs)``, or ``(STOP | REPORT, rank 0's argument)``."""
        from ..runtime.sequence_info import HEADER

        self._check(info)
        buf = info.buffer
        dist.broadcast(buf[: self.size], 0)
        code, num_seqs, num_tokens, num_logits = buf[:HEADER].tolist()
        if code != self.STEP:
            return code, num_seqs
        end = info.packed_size(num_seqs, num_tokens, num_logits)
        if end > self.size:
            dist.broadcast(buf[self.size: end], 0)
        return code, info.views(num_seqs, num_tokens, num_logits)


def step_message_size(args: Any) -> int:
    """The step channel's message for these args: ``sequence_info.message_size`` of the sequence
    buffer that ``CacheInterface.from_args`` makes (checked against it at the first step)."""
    from ..runtime.sequence_info import message_size

    return message_size(int(args.max_batch_size), math.ceil(int(args.max_seq_len) / int(args.attn_page_size)))


class StepTimes:
    """A worker's time per step: ``host_s`` from the step's inputs in hand to its forward launched
    (on the CPU: done), ``wait_s`` in the receive (waiting for rank 0, the transfer, the header read);
    decode steps (one token per sequence) also apart."""

    def __init__(self):
        self.totals = dict.fromkeys(("steps", "host_s", "wait_s", "decode_steps", "decode_host_s", "decode_wait_s"), 0)

    def add(self, inputs, host_s: float, wait_s: float) -> None:
        t = self.totals
        t["steps"] += 1
        t["host_s"] += host_s
        t["wait_s"] += wait_s
        if inputs.num_tokens == inputs.num_seqs:
            t["decode_steps"] += 1
            t["decode_host_s"] += host_s
            t["decode_wait_s"] += wait_s


class Ranks:
    """Rank 0's handle on the other ranks: start-up, the step channel, failures, shutdown.

    The watchdog runs from construction, i.e. from the moment the spawned workers exist."""

    def __init__(self, env: RankEnv, store, procs: list, cpu_threads: "int | None" = None):
        self.env, self.store, self.procs = env, store, procs
        self.device: Optional[torch.device] = None
        self.channel: Optional[StepChannel] = None
        self.cpu_threads = cpu_threads  # each rank's CPU threads, when rank 0 chose them
        self.worker_threads: dict[int, int] = {}  # what each worker reported when it checked in
        self._threads_before: Optional[int] = None
        self._failure: Optional[RankFailure] = None
        self._closed = False
        self._busy = 0  # > 0 while rank 0 is inside a step (a collective may block)
        self._reports = 0  # REPORT messages sent (worker_step_times)
        atexit.register(self.shutdown)
        if procs:
            threading.Thread(target=self._watch, name="autodeploy-rank-watchdog", daemon=True).start()

    @property
    def world_size(self) -> int:
        return self.env.world_size

    # --- start-up ---
    def connect(self, config: Any) -> None:
        """Share the config, wait until every worker has checked in (failing at once if one dies or
        raises meanwhile), then set up the process group."""
        self.store.set(CONFIG_KEY, pickle.dumps(config))  # the typed ExperimentConfig, as rank 0 runs it
        self.device = rank_device(str(config.args.device), self.env.local_rank)
        if self.cpu_threads is not None and self.device.type == "cpu":
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.cpu_threads)
        self._await_workers()
        with self.busy():  # a worker that fails inside the group's set-up: the watchdog ends the wait
            _init_group(self.env, self.store, self.device)
        self.channel = StepChannel(self.device, step_message_size(config.args))
        threads = ""
        if self.device.type == "cpu":
            chosen = ("OMP_NUM_THREADS of the environment" if self.cpu_threads is None
                      else f"{cpu_cores()} cores / {self.world_size} ranks; OMP_NUM_THREADS overrides")
            threads = f", {torch.get_num_threads()} CPU thread(s) per rank ({chosen})"
        log.info("%d ranks (%s), %s backend%s", self.world_size, self.env.launcher, dist.get_backend(), threads)

    def _await_workers(self) -> None:
        pending = set(range(1, self.world_size))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while pending:
            failure = self._failure or self._find_failure()
            if failure is not None:
                self._failure = failure
                raise failure
            for rank in sorted(pending):
                key = READY_KEY.format(rank=rank)
                if self.store.check([key]):
                    self.worker_threads[rank] = int(self.store.get(key).decode())
                    pending.discard(rank)
            if pending and time.monotonic() > deadline:
                self._failure = RankFailure(
                    f"rank(s) {', '.join(map(str, sorted(pending)))} did not start within {STARTUP_TIMEOUT_S:.0f} s "
                    f"({self.env.launcher} launcher)")
                raise self._failure
            time.sleep(0.05)

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

    def worker_step_times(self, timeout_s: float = 60.0) -> dict[int, dict]:
        """Each worker's ``StepTimes`` totals so far, by rank: asked over the step channel (between
        steps), answered through the store."""
        self.check()
        self._reports += 1
        keys = {r: STEP_TIMES_KEY.format(rank=r, seq=self._reports) for r in range(1, self.world_size)}
        try:
            with self.busy():
                self.channel.send_control(StepChannel.REPORT, self._reports)
                self.store.wait(list(keys.values()), datetime.timedelta(seconds=timeout_s))
            return {r: json.loads(self.store.get(k).decode()) for r, k in keys.items()}
        except RuntimeError as e:
            raise self.failure(e) or e

    @contextlib.contextmanager
    def busy(self):
        """Marks rank 0 as inside a step or the build (its collectives may block on a dead peer)."""
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
        errors = []  # (order of failing, rank, error)
        for rank in range(1, self.world_size):
            key = ERROR_KEY.format(rank=rank)
            try:
                if self.store.check([key]):
                    seq_key = ERROR_SEQ_KEY.format(rank=rank)
                    seq = int(self.store.get(seq_key).decode()) if self.store.check([seq_key]) else 1 << 30
                    errors.append((seq, rank, self.store.get(key).decode()))
            except Exception:  # noqa: BLE001 - the store lives in rank 0 or the launcher; a dead store says nothing
                pass
        if errors:  # the first rank to fail; the others typically lost their peer in a collective
            _, rank, error = min(errors)
            return RankFailure(f"rank {rank} failed: {error}")
        for proc in self.procs:
            if proc.exitcode not in (None, 0):
                return RankFailure(f"rank {proc.rank} died ({_describe_exit(proc.exitcode)})")
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
            time.sleep(0.2)

    # --- shutdown ---
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        if self._failure is None and self.channel is not None:
            try:
                self.channel.send_stop()
            except Exception as e:  # noqa: BLE001 - a worker may be gone already
                log.debug("could not tell the workers to stop: %s", e)
        for proc in self.procs:
            proc.join(timeout=30 if self._failure is None and self.channel is not None else 1)
        if not self.procs and self._failure is None and self.channel is not None:  # torchrun/SLURM ranks: not ours to join
            self._wait_workers_left()
        self._kill_workers()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001
                log.debug("destroy_process_group: %s", e)
        from .collectives import reset_groups

        reset_groups()
        if self._threads_before is not None:  # the user's process keeps running (LLM API)
            torch.set_num_threads(self._threads_before)

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


def start(config: Any, world: int) -> Ranks:
    """Rank 0 of ``world`` ranks: join the external launcher's ranks or spawn the workers, share
    ``config`` (the typed experiment config), and set up the process group."""
    env = launcher_env()
    procs: list = []
    threads = None
    if env is not None:  # its world size matches (config/preflight.py checked)
        if env.rank != 0:
            raise RuntimeError(f"rank {env.rank} must run worker_main, not start the run")
        store = _store(env)
    else:
        # rank 0 hosts the store on a port the OS picks, before any worker looks for it
        host = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        env = RankEnv(0, world, 0, "127.0.0.1", host.port, "spawn")
        store = dist.PrefixStore("autodeploy", host)
        if rank_device(str(config.args.device), 0).type == "cpu":
            threads = cpu_threads_per_rank(world)
        procs = spawn_workers(world, env.master_port, threads)
    ranks = Ranks(env, store, procs, cpu_threads=threads)
    try:
        ranks.connect(config)
    except BaseException:
        ranks.shutdown()
        raise
    return ranks


class _OwnRecords(logging.Filter):
    """A worker's own records: its errors, and warnings of its process group and collectives. The
    rest (the model, the export, the plan) is the same on every rank, and rank 0 reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.startswith(__package__)


def worker_logging(rank: int) -> None:
    """Ranks > 0 print only what is theirs, each line prefixed with the rank."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_OwnRecords())
    logger = logging.getLogger("autodeploy")
    logger.handlers[:] = [handler]
    logger.propagate = False  # not also through a root handler (torchrun's, Hydra's)
    logger.setLevel(logging.WARNING)


def worker_main(env: RankEnv) -> None:
    """Ranks 1..N-1: build the same pipeline on this rank's shard, then run rank 0's steps."""
    from ..build import build_engine

    worker_logging(env.rank)
    faulthandler.enable()  # a fatal signal (an abort in a C++ library) prints the Python stack
    store = _store(env)
    try:
        config = pickle.loads(store.get(CONFIG_KEY))  # noqa: S301 - rank 0 of this run wrote it
        device = rank_device(str(config.args.device), env.local_rank)
        injected_fault(env.rank, "start")
        store.set(READY_KEY.format(rank=env.rank), str(torch.get_num_threads()))
        _init_group(env, store, device)
        injected_fault(env.rank, "group")
        built = build_engine(config.args, rank=env.rank, world_size=env.world_size, progress=False)

        def report(seq: int, times: StepTimes) -> None:
            store.set(STEP_TIMES_KEY.format(rank=env.rank, seq=seq), json.dumps(times.totals))

        serve(built.engine, StepChannel(device, step_message_size(config.args)), report)
    except BaseException as e:
        try:
            store.set(ERROR_SEQ_KEY.format(rank=env.rank), str(store.add("errors", 1)))
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


def serve(engine, channel: StepChannel, report=None) -> None:
    """Run rank 0's steps until it says stop; ``report(seq, times)`` answers its REPORT messages."""
    info = engine.cache.info
    times = StepTimes()
    while True:
        t0 = time.perf_counter()
        code, payload = channel.receive(info)
        t1 = time.perf_counter()
        if code == StepChannel.STOP:
            return
        if code == StepChannel.REPORT:
            if report is not None:
                report(payload, times)
            continue
        engine.forward(payload)
        times.add(payload, host_s=time.perf_counter() - t1, wait_s=t1 - t0)
