"""One sweep job's outcome on disk: ``results.json`` when it ran, ``failure.json`` when it failed."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("autodeploy")

RESULTS_FILE = "results.json"
FAILURE_FILE = "failure.json"


def process_rank() -> int:
    """This process's rank when an external launcher started several (torchrun, SLURM tasks)."""
    from autodeploy.distributed.env import launcher_env

    env = launcher_env()
    return 0 if env is None else env.rank


def describe(error: BaseException) -> str:
    """One line for a table: the exception's type and first line, plus the last line of a long
    message (a submitit error carries the job's traceback or stderr; its last line is the cause)."""
    message = str(error).split("You can check full logs")[0]  # submitit's footer: paths to the logs
    lines = [line.strip() for line in message.splitlines() if line.strip().strip("-")]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    if len(lines) > 1 and lines[-1] != lines[0]:
        text += f" | {lines[-1]}"
    return text


def record_failure(job_dir: str | os.PathLike, error: BaseException, overrides: Sequence[str],
                   job_num: int | None = None, source: str = "job") -> dict[str, Any]:
    """Write ``failure.json`` into the job folder; an existing record (the job's own) is kept."""
    path = Path(job_dir) / FAILURE_FILE
    if path.exists():
        return json.loads(path.read_text())
    record = {
        "status": "failed",
        "error": describe(error),
        "error_type": type(error).__name__,
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "overrides": list(overrides),
        "job_num": job_num,
        "recorded_by": source,  # "job": the job caught it; "launcher": the job's process died
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return record


def run_isolated(job: Callable[[], Any], job_dir: str, overrides: Sequence[str], job_num: int | None) -> Any:
    """Run one job of a multirun: an exception is recorded in its folder and the sweep goes on.

    Only rank 0 records; a worker rank re-raises so its launcher sees the failure.
    """
    try:
        return job()
    except Exception as error:
        if process_rank() != 0:
            raise
        record = record_failure(job_dir, error, overrides, job_num)
        log.exception("job %s failed: %s (recorded in %s)", job_num, record["error"], Path(job_dir) / FAILURE_FILE)
        _release_memory()
        return record


def _release_memory() -> None:
    """Jobs of the basic launcher share one process: what a failed job held goes before the next."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
