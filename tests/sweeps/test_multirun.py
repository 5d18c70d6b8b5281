"""Real multiruns through every launcher: each job runs, a failed one is recorded, the sweep ends
with its summary and a non-zero exit when a job failed."""

import pytest

from sweep_helpers import FAST, ROOT, assert_png, failure, launch, results, show, summary_rows, wandb_run

pytestmark = pytest.mark.slow


def test_default_launcher_survives_a_bad_job_config(tmp_path):
    """args.max_seq_len=0 is a config error: once it ended the whole sweep (sys.exit in the job)."""
    sweep = tmp_path / "sweep"
    proc = launch(tmp_path, "-m", *FAST, "args.max_seq_len=128,256,0", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, show(proc)
    assert f"1 of 3 jobs failed; see {sweep / 'summary.md'}" in proc.stderr
    for num, seq in ((0, 128), (1, 256)):
        res = results(sweep / str(num))
        assert res["config"]["args"]["max_seq_len"] == seq and res["generations"][0]["error"] is None
    assert not (sweep / "2" / "results.json").exists()
    assert "args.max_seq_len=0 must be >= 1" in failure(sweep / "2")["error"]

    rows = summary_rows(sweep)
    assert [(r["job"], r["args.max_seq_len"], r["status"]) for r in rows] == [
        ("0", "128", "ok"), ("1", "256", "ok"), ("2", "0", "failed")]
    assert "args.max_seq_len=0 must be >= 1" in rows[2]["error"]
    assert float(rows[0]["build_s"]) > 0 and rows[2]["build_s"] == ""
    md = (sweep / "summary.md").read_text()
    assert "3 jobs: 2 ok, 1 failed" in md and "args.max_seq_len=0 must be >= 1" in md
    assert_png(sweep / "summary.png")
    assert "| 2 | 0 | failed |" in proc.stdout  # the table is printed too


def test_local_launcher_one_process_per_job_survives_a_crash(tmp_path):
    """hydra/launcher=local: a job that fails in the build (a checkpoint of another shape) is
    recorded by the job itself; the other two run in their own processes."""
    sweep = tmp_path / "sweep"
    grid = "++args.model_kwargs={num_hidden_layers:1},{num_hidden_layers:2},{num_key_value_heads:3}"
    # two processes at a time: the third job waits for the first
    proc = launch(tmp_path, "-m", "hydra/launcher=local", "hydra.launcher.array_parallelism=2", *FAST, grid,
                  f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, show(proc)
    assert f"1 of 3 jobs failed; see {sweep / 'summary.md'}" in proc.stderr
    layers = [results(sweep / str(n))["config"]["args"]["model_kwargs"]["num_hidden_layers"] for n in (0, 1)]
    assert layers == [1, 2]
    fail = failure(sweep / "2")
    assert fail["recorded_by"] == "job" and "num_key_value_heads=3" in fail["error"] and "Traceback" in fail["traceback"]
    rows = summary_rows(sweep)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[2]["args.model_kwargs"] == "{num_key_value_heads:3}" and "num_key_value_heads=3" in rows[2]["error"]
    assert "num_key_value_heads=3" in (sweep / "summary.md").read_text()
    assert_png(sweep / "summary.png")
    # one submitit process per job
    assert len([p for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name != "%j"]) == 3


def test_tiny_cpu_sweep_file_runs_with_offline_wandb(tmp_path):
    """The sweep CI runs (sweeps/tiny_cpu.yaml: a tiny benchmark per job) with logger=wandb and
    WANDB_MODE=offline: each job folder holds an offline W&B run with the config and the TTFT/TPOT
    metrics, grouped by the sweep and named after the job's overrides."""
    sweep = tmp_path / "sweep"
    proc = launch(tmp_path, "-cd", str(ROOT / "sweeps"), "-cn", "tiny_cpu", "logger=wandb", f"hydra.sweep.dir={sweep}",
                  env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, show(proc)
    rows = summary_rows(sweep)
    assert [(r["benchmark.bs"], r["status"]) for r in rows] == [("1", "ok"), ("2", "ok")]
    for row in rows:
        assert float(row["ttft_p50_ms"]) > 0 and float(row["tpot_p50_ms"]) > 0 and float(row["output_tok_s"]) > 0
    assert [results(sweep / str(n))["benchmark"]["bs"] for n in (0, 1)] == [1, 2]
    assert_png(sweep / "summary.png")

    for num in (0, 1):
        run = wandb_run(sweep / str(num))
        bench = results(sweep / str(num))["benchmark"]
        assert run["config"]["model"] == "tiny_llama" and run["config"]["benchmark"]["bs"] == num + 1
        assert run["config"]["args"]["device"] == "cpu" and run["job_type"] == "benchmark"
        assert run["summary"]["benchmark/ttft_ms/p50"] == pytest.approx(bench["ttft_ms"]["p50"])
        assert run["summary"]["benchmark/tpot_ms/p50"] == pytest.approx(bench["tpot_ms"]["p50"])
        assert run["group"] == str(sweep) and f"benchmark.bs={num + 1}" in run["name"]
        assert "transforms" in run["logged"]  # the transform report, as a table
        assert "benchmark/itl_trace/itl_ms_chart_table" in run["logged"]  # the ITL of every step, a chart
