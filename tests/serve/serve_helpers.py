"""Helpers for the serving tests: the tiny server's limits, and ``launch.py`` servers as processes.
(A module of its own, not conftest: ``from conftest import`` would find another directory's conftest.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_SEQ_LEN = 512
CPU_ARGS = ["args.device=cpu", "transforms/compile=torch-simple", "args.attn_page_size=16"]


class ServerProcess:
    """``launch.py ... server=openai server.port=0`` (or ``autodeploy serve``) as a process of its
    own session (a process group: what a terminal's Ctrl-C reaches); its URL from its first line."""

    def __init__(self, argv: list[str], cwd: Path, timeout: float = 240):
        self.log = cwd / "server.log"
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(r"\[serve \] \S+ at (http://\S+)/v1", self.output())
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the server did not start (exit code {self.proc.poll()}):\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text()

    def children(self) -> list[int]:
        """Processes whose parent is the server (its worker ranks)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                found.append(int(stat.parent.name))
        return found

    def signal(self, sig: int, group: bool = False) -> None:
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server did not exit within {timeout} s:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def launch_argv(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), *args]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
