"""W&B logging of a run (``logger=wandb`` / ``logger=wandb_offline``); needs ``pip install autodeploy[wandb]``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Scalars worth a column in the runs table: build time and benchmark figures."""
    out: dict[str, float] = {}
    if "build_s" in results:
        out["build_s"] = results["build_s"]
    for key, value in (results.get("benchmark") or {}).items():
        if isinstance(value, (int, float)):
            out[f"benchmark/{key}"] = value
        elif isinstance(value, dict):
            out.update({f"benchmark/{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
    return out


def log_to_wandb(logger: Any, results: dict[str, Any], out_dir: Path) -> None:
    try:
        import wandb
    except ImportError:
        raise RuntimeError("logger=wandb needs the wandb package: pip install 'autodeploy[wandb]'") from None
    cfg = results["config"]
    name = f"{cfg['model']}-{cfg['args']['compile_backend']}-{cfg['args']['attn_backend']}-ws{cfg['args']['world_size']}"
    with wandb.init(project=logger.project, entity=logger.entity, mode=logger.mode, group=logger.group,
                    tags=list(logger.tags), name=name, config=cfg, dir=str(out_dir)) as run:
        run.summary.update(flat_metrics(results))
        rows = [[t["name"], t["stage"], t["skipped"], t["num_matches"], t["time_s"]] for t in results["transforms"]]
        run.log({"transforms": wandb.Table(columns=["name", "stage", "skipped", "num_matches", "time_s"], data=rows)})
