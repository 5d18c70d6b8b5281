"""W&B logging of a run (``logger=wandb``); needs ``pip install 'autodeploy[wandb]'``.

One W&B run per job, in the job's folder (``<run dir>/wandb/``): the resolved config, the transform
report, the sharding plan (when the run has one), the benchmark metrics (summary) and each
per-step series of the benchmark (e.g. the ITL series) as a line chart. The run is named after the
job's overrides and grouped by its sweep. Offline unless ``logger.mode=online``; the environment's
``WANDB_MODE`` wins over both (tests and CI set ``disabled``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import ConfigError

INSTALL_HINT = "pip install 'autodeploy[wandb]'"


def check_logger(logger: Any) -> None:
    """Config time, before any model work: the chosen logger can actually log."""
    if logger.name != "wandb":
        return
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"logger=wandb needs the wandb package ({e}): {INSTALL_HINT}") from None


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Scalars worth a column in the runs table: build time, benchmark and sharding figures."""
    out: dict[str, float] = {}
    if isinstance(results.get("build_s"), (int, float)):
        out["build_s"] = results["build_s"]
    for section in ("benchmark", "sharding_summary"):
        for key, value in (results.get(section) or {}).items():
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                out[f"{section}/{key}"] = value
            elif isinstance(value, dict):
                out.update({f"{section}/{key}/{k}": v for k, v in value.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def series(results: dict[str, Any]) -> dict[str, list[float]]:
    """Per-step series of the benchmark (lists of numbers, e.g. ``itl_trace.itl_ms``: the ITL of
    every decode step), at its top level or one mapping down (not inside ``by_batch_size``)."""
    out = {}

    def walk(node: Any, path: str, depth: int = 0) -> None:
        if isinstance(node, dict) and depth < 2:
            for k, v in node.items():
                walk(v, f"{path}/{k}", depth + 1)
        elif isinstance(node, list) and len(node) > 1 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in node):
            out[path] = [float(x) for x in node]

    walk(results.get("benchmark") or {}, "benchmark")
    return out


def wandb_mode(logger: Any) -> str:
    """``WANDB_MODE`` from the environment wins (CI sets ``disabled``), else ``logger.mode``."""
    return os.environ.get("WANDB_MODE") or logger.mode


def run_identity(logger: Any) -> tuple[str | None, str | None]:
    """(name, group): the job's overrides and its sweep folder, when Hydra runs the job."""
    name, group = None, logger.group
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            name = ",".join(hc.overrides.task) or None
            if group is None and hc.mode == RunMode.MULTIRUN:
                group = str(hc.sweep.dir)
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return name, group


def _table(wandb: Any, rows: list[dict[str, Any]]) -> Any:
    """A W&B table of report rows; nested values become text so every column has one type."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    data = [[_cell(row.get(c)) for c in columns] for row in rows]
    return wandb.Table(columns=columns, data=data)


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def log_to_wandb(logger: Any, results: dict[str, Any], out_dir: Path) -> None:
    check_logger(logger)
    import wandb

    cfg = results["config"]
    name, group = run_identity(logger)
    if name is None:
        name = str(cfg.get("model"))
    mode = wandb_mode(logger)
    job_type = "benchmark" if results.get("benchmark") else "run"
    with wandb.init(project=logger.project, entity=logger.entity, mode=mode, group=group, name=name,
                    tags=list(logger.tags), job_type=job_type, config=cfg, dir=str(out_dir)) as run:
        run.summary.update(flat_metrics(results))
        logs: dict[str, Any] = {}
        if results.get("transforms"):
            logs["transforms"] = _table(wandb, results["transforms"])
        if results.get("sharding_plan"):
            logs["sharding_plan"] = _table(wandb, results["sharding_plan"])
        for key, values in series(results).items():
            table = wandb.Table(columns=["step", key], data=[[i, v] for i, v in enumerate(values)])
            logs[f"{key}_chart"] = wandb.plot.line(table, "step", key, title=f"{key} per step")
        if logs:
            run.log(logs)
