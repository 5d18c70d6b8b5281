"""A benchmark's progress with its ETA: a bar on a terminal, a line now and then in a log.

A long benchmark must not run silently (a batch-8, 1024-token benchmark on a CPU takes many
minutes). On a terminal (stderr a TTY) it is a tqdm bar; otherwise one line at the first update,
then at most every ``every_s`` seconds and at the end, through the ``autodeploy`` logger (the
console and the run's log). No import beyond the standard library and tqdm.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger("autodeploy")


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "round", every_s: float = 5.0, tty: Optional[bool] = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self.start = self._last = time.perf_counter()
        tty = sys.stderr.isatty() if tty is None else tty
        self._bar = None
        if tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.n == n or self.n >= self.total or now - self._last >= self.every_s:
            self._last = now
            log.info("%s", self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s, {_duration(elapsed)}"
        if 0 < self.n < self.total:
            text += f", ETA {_duration(elapsed / self.n * (self.total - self.n))}"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
