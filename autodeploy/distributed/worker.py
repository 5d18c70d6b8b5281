"""``python -m autodeploy.distributed.worker RANK WORLD_SIZE PORT PARENT_PID``: a rank that rank 0
started itself (``ranks.start``).

A process of its own rather than a ``multiprocessing`` spawn, which re-imports the user's main
module in the child: a script calling ``LLM(..., world_size=2)`` at module level, without an
``if __name__ == "__main__":`` guard, would start its ranks again from inside a worker. This module
imports nothing of the user's; it reads everything else from rank 0's store (``worker_main``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback


def main(argv: list[str]) -> None:
    rank, world, port, parent = (int(a) for a in argv)
    # rank 0 ends the workers it started (stop broadcast, or this process follows it out): a terminal's
    # Ctrl-C reaches the whole process group, and a worker dying of it first would turn rank 0's orderly
    # shutdown (a server draining its requests) into a rank failure
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()

    from .env import RankEnv
    from .ranks import injected_fault, limit_cpu_threads, worker_main

    injected_fault(rank, "exit")
    limit_cpu_threads()  # OMP_NUM_THREADS, as rank 0 set it for this rank
    code = 0
    try:
        worker_main(RankEnv(rank, world, rank, "127.0.0.1", port, "spawn"))
    except BaseException:  # noqa: BLE001 - its error is in the store for rank 0; the traceback goes to stderr
        print(f"[autodeploy rank {rank}] {traceback.format_exc()}", file=sys.stderr, flush=True)
        code = 1
    # leave without the interpreter's teardown, where C++ threads of torch's libraries are destroyed
    # at random (cli.main does the same for torchrun's ranks)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with_parent(parent: int) -> None:
    """A worker whose rank 0 is gone has nobody to serve."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


if __name__ == "__main__":
    main(sys.argv[1:])
