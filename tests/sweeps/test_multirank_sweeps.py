"""Sweeps of multi-rank jobs on CPU (gloo): a job spawns its ranks itself, or SLURM starts one task
per rank; only rank 0 writes results. And the process_grid sweep file, planned on meta."""

import os
import re

import pytest

import fake_slurm
from sweep_helpers import FAST, ROOT, assert_png, launch, results, show, summary_rows

pytestmark = pytest.mark.slow


def test_basic_launcher_job_spawns_its_ranks(tmp_path):
    sweep = tmp_path / "sweep"
    proc = launch(tmp_path, "-m", *FAST, "args.world_size=1,2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, show(proc)
    rows = summary_rows(sweep)
    assert [(r["args.world_size"], r["status"]) for r in rows] == [("1", "ok"), ("2", "ok")]
    assert results(sweep / "1")["sharding_summary"]["world_size"] == 2
    assert float(rows[1]["bytes_per_rank"]) > 0


def test_slurm_tasks_are_the_ranks(tmp_path):
    """tasks_per_node = args.world_size: two SLURM tasks join as ranks 0 and 1; rank 0 alone writes."""
    fake_slurm.install(tmp_path / "bin")
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path / "state")}
    sweep = tmp_path / "sweep"
    proc = launch(tmp_path, "-m", "hydra/launcher=slurm", "args.world_size=2", *FAST, f"hydra.sweep.dir={sweep}", env=env)
    assert proc.returncode == 0, show(proc)
    script = next((tmp_path / "state").glob("sbatch_*.sh")).read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))
    assert flags["ntasks-per-node"] == "2" and flags["gpus-per-node"] == "2" and flags["nodes"] == "1"
    assert "array" not in flags  # a single job is no array
    assert [p.parent.name for p in sweep.rglob("results.json")] == ["0"]
    assert not list(sweep.rglob("failure.json"))
    assert results(sweep / "0")["sharding_summary"]["world_size"] == 2
    assert [r["status"] for r in summary_rows(sweep)] == ["ok"]


def test_process_grid_sweep_file_plans_every_grid(tmp_path):
    """sweeps/process_grid.yaml with plan_only=true: the four grids of 4 ranks, planned on meta (no
    GPUs), one row each with its bytes per rank."""
    sweep = tmp_path / "sweep"
    proc = launch(tmp_path, "-cd", str(ROOT / "sweeps"), "-cn", "process_grid", "model=tiny_mixtral", "plan_only=true",
                  f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, show(proc)
    rows = summary_rows(sweep)
    assert [r["status"] for r in rows] == ["ok"] * 4
    grids = [results(sweep / str(n))["config"]["args"]["transforms"]["detect_sharding"] for n in range(4)]
    assert [(g["sharding_dims"], g["process_grid"]) for g in grids] == [
        (["tp", "ep"], {"ep": 4}), (["tp", "ep"], {"ep": 2, "tp": 2}), (["tp", "ep"], {"ep": 1, "tp": 4}), (["tp"], None)]
    for n, row in enumerate(rows):
        assert results(sweep / str(n))["sharding_summary"]["world_size"] == 4 and float(row["bytes_per_rank"]) > 0
    # the same bytes per rank for every grid; the experts each rank holds tell them apart ({ep: 1, tp: 4} and pure
    # TP are one plan: every rank holds a quarter of each expert), and the picture shows that column
    assert len({row["bytes_per_rank"] for row in rows}) == 1
    assert [float(row["experts_per_rank"]) for row in rows] == [1, 2, 4, 4]
    assert all(float(row["collectives"]) > 0 and float(row["comm_bytes_per_token"]) > 0 for row in rows)
    assert results(sweep / "1")["sharding_summary"]["moe"][0]["expert_groups"] == [
        {"experts": [0, 2], "ranks": [0, 1]}, {"experts": [2, 4], "ranks": [2, 3]}]
    assert "![experts_per_rank per job](summary.png)" in (sweep / "summary.md").read_text()
    assert_png(sweep / "summary.png")
