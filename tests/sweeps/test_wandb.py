"""logger=wandb: what a run logs, which mode wins, and a missing wandb as a config-time error.
(A real sweep's offline runs are read back in test_multirun.py.)"""

import pytest
from omegaconf import OmegaConf

from autodeploy.config import ConfigError
from autodeploy.tracking import check_logger, log_to_wandb, wandb_mode
from sweep_helpers import FAST, launch, show, wandb_records, wandb_run


def test_tables_and_per_step_series(tmp_path, monkeypatch):
    """The sharding plan and the transform report become tables; each per-step series of the
    benchmark (the ITL of every step) a line chart."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    results = {
        "config": {"model": "m", "args": {"world_size": 2}},
        "build_s": 1.5,
        "transforms": [{"name": "export_to_gm", "stage": "export", "skipped": False, "num_matches": 1, "time_s": 0.5}],
        "sharding_plan": [{"target": "q_proj", "strategy": "colwise", "source": "heuristic", "dim": 0,
                           "bytes_per_rank": 512}],
        "sharding_summary": {"world_size": 2, "bytes_per_rank_max": 4096, "collectives_per_forward": {"all_reduce": 4}},
        "benchmark": {"ttft_ms": {"p50": 3.0}, "output_tok_s": 10.0,
                      "itl_trace": {"t_s": [0.1, 0.2, 0.3], "itl_ms": [1.0, 1.5, 1.25]},
                      "by_batch_size": {"1": {"itl_trace": {"t_s": [0.1, 0.2], "itl_ms": [1.0, 1.5]}}}},
    }
    logger = OmegaConf.create({"name": "wandb", "project": "p", "entity": None, "mode": "offline", "group": "g",
                               "tags": ["t"]})
    log_to_wandb(logger, results, tmp_path)
    import wandb

    wandb.teardown()  # in-process: wait for the W&B service to flush the run file
    run = wandb_run(tmp_path)
    assert run["name"] == "m" and run["group"] == "g"
    assert run["summary"]["sharding_summary/bytes_per_rank_max"] == 4096
    assert run["summary"]["sharding_summary/collectives_per_forward/all_reduce"] == 4
    assert run["summary"]["benchmark/ttft_ms/p50"] == 3.0
    assert {"transforms", "sharding_plan", "benchmark/itl_trace/itl_ms_chart_table"} <= run["logged"]
    assert not any("by_batch_size" in key for key in run["logged"])  # the same trace again: not charted twice
    charts = [r.config for r in wandb_records(tmp_path) if r.WhichOneof("record_type") == "config"]
    assert any("benchmark/itl_trace/itl_ms_chart" in list(u.nested_key) for c in charts for u in c.update)


def test_mode_environment_wins(monkeypatch):
    logger = OmegaConf.create({"mode": "online"})
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(logger) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(logger) == "offline"


def test_missing_wandb_is_a_config_time_error(tmp_path, monkeypatch):
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, "logger=wandb", *FAST, f"hydra.run.dir={run_dir}", env={"PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 2, show(proc)
    assert "Error: logger=wandb needs the wandb package (No module named 'wandb'): pip install 'autodeploy[wandb]'" \
        in proc.stderr
    assert "[prompt]" not in proc.stdout and not (run_dir / "results.json").exists()  # no model work
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # in-process: import wandb fails
    with pytest.raises(ConfigError, match="logger=wandb needs the wandb package"):
        check_logger(OmegaConf.create({"name": "wandb"}))
    check_logger(OmegaConf.create({"name": "none"}))  # nothing to check
