"""The Hydra callback that writes the sweep summary when a multirun ends (any launcher).

Configured in ``conf/config.yaml`` under ``hydra.callbacks.sweep_summary``; pick the picture's
metric with ``hydra.callbacks.sweep_summary.metric=ttft_p50_ms``.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("autodeploy")

# The last summary this process wrote: `launch.py` reads it to exit non-zero when a job failed.
_last_summary = None


def last_summary():
    return _last_summary


class SweepSummary(Callback):
    def __init__(self, metric: str | None = None) -> None:
        from .summary import METRICS

        columns = [c for c, _ in METRICS]
        if metric is not None and metric not in columns:  # at start-up, not after the jobs ran
            raise ValueError(f"hydra.callbacks.sweep_summary.metric={metric!r} is not a summary column; "
                             f"choose one of: {', '.join(columns)}")
        self.metric = metric
        self.sweep_dir: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # resolved once, at the start: ${now:...} in the folder name must not move
        self.sweep_dir = str(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _last_summary
        from omegaconf import OmegaConf

        from .summary import markdown_table, write_summary

        if OmegaConf.select(config, "dry_run", default=False):
            return  # nothing ran: the jobs printed their configs
        sweep_dir = self.sweep_dir or str(config.hydra.sweep.dir)
        summary = write_summary(sweep_dir, metric=self.metric)
        print(markdown_table(summary), flush=True)
        log.info("sweep summary: %s", ", ".join(str(p) for p in summary.files))
        _last_summary = summary
