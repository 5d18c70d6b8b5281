"""Sweeps of multi-rank jobs on CPU (gloo): a job spawns its ranks itself, or SLURM starts one task
per rank; only rank 0 writes results. Skipped until autodeploy.distributed (sharding) exists."""

import os

import pytest

import fake_slurm
from sweep_helpers import FAST, launch, results, show, summary_rows

pytest.importorskip("autodeploy.distributed", reason="multi-rank runs need autodeploy.distributed (the sharding issue)")
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
    assert [p.parent.name for p in sweep.rglob("results.json")] == ["0"]
    assert not list(sweep.rglob("failure.json"))
    assert results(sweep / "0")["sharding_summary"]["world_size"] == 2
    assert [r["status"] for r in summary_rows(sweep)] == ["ok"]
