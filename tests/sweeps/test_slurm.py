"""hydra/launcher=slurm: the resolved fields, the job script submitit writes (against a fake
sbatch/srun/sacct that run it here), a job the node kills, and resource checks before submitting."""

import os
import re

import pytest
import yaml

import fake_slurm
from sweep_helpers import FAST, failure, launch, results, show, summary_rows


@pytest.fixture
def slurm(tmp_path):
    """PATH with the fake SLURM commands; returns the folder where they keep their state."""
    fake_slurm.install(tmp_path / "bin")
    state = tmp_path / "slurm_state"
    return state, {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}


@pytest.fixture
def local_conf(tmp_path):
    """A user's git-ignored conf/local/slurm.yaml, found through --config-dir."""
    conf = tmp_path / "conf"
    (conf / "local").mkdir(parents=True)
    (conf / "local" / "slurm.yaml").write_text("partition: fakepart\naccount: fromfile\ncpus_per_task: 4\n")
    return conf


def _launcher_cfg(proc):
    assert proc.returncode == 0, show(proc)
    return yaml.safe_load(proc.stdout)["hydra"]["launcher"]


def test_cfg_hydra_shows_slurm_fields_resolved(tmp_path, local_conf):
    proc = launch(tmp_path, "-m", "hydra/launcher=slurm", "args.world_size=8", "hydra.launcher.partition=h200",
                  "hydra.launcher.account=proj", "hydra.launcher.timeout_min=30", "--cfg", "hydra", "--resolve")
    launcher = _launcher_cfg(proc)
    assert launcher["_target_"] == "hydra_plugins.autodeploy_launcher.autodeploy_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 8, 8)
    assert (launcher["partition"], launcher["account"], launcher["timeout_min"]) == ("h200", "proj", 30)
    assert launcher["array_parallelism"] == 256 and launcher["cpus_per_task"] == 16
    # unresolved, the preset shows where the ranks come from
    raw = _launcher_cfg(launch(tmp_path, "hydra/launcher=slurm", "--cfg", "hydra"))
    assert raw["tasks_per_node"] == "${args.world_size}" and raw["gpus_per_node"] == "${.tasks_per_node}"
    # conf/local/slurm.yaml fills the cluster fields; the command line still wins
    local = _launcher_cfg(launch(tmp_path, "-cd", str(local_conf), "hydra/launcher=slurm", "hydra.launcher.account=cli",
                                 "--cfg", "hydra", "--resolve"))
    assert (local["partition"], local["account"], local["cpus_per_task"]) == ("fakepart", "cli", 4)


@pytest.mark.slow
def test_fake_sbatch_runs_the_job_script_and_a_killed_job_is_recorded(tmp_path, slurm, local_conf):
    state, env = slurm
    sweep = tmp_path / "sweep"
    proc = launch(tmp_path, "-m", "-cd", str(local_conf), "hydra/launcher=slurm", "hydra.launcher.timeout_min=7",
                  *FAST, "prompt.sp_kwargs.max_tokens=3,4", f"hydra.sweep.dir={sweep}",
                  env={**env, "FAKE_SLURM_KILL": "1"})  # array task 1 dies as an OOM kill does
    assert proc.returncode == 1, show(proc)
    scripts = sorted(state.glob("sbatch_*.sh"))
    assert len(scripts) == 1  # the sweep is one job array
    script = scripts[0].read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))
    assert flags["array"] == "0-1%2" and flags["nodes"] == "1"
    assert flags["ntasks-per-node"] == "1" and flags["gpus-per-node"] == "1"  # one rank, one GPU
    assert flags["time"] == "7" and flags["cpus-per-task"] == "4"
    assert flags["partition"] == "fakepart" and flags["account"] == "fromfile"
    command = script.strip().splitlines()[-1]
    assert command.startswith("srun --unbuffered --output ")
    assert command.endswith(f"-u -m submitit.core._submit {sweep}/.submitit/%j")

    assert results(sweep / "0")["config"]["prompt"]["sp_kwargs"]["max_tokens"] == 3
    killed = failure(sweep / "1")
    assert killed["recorded_by"] == "launcher" and killed["job_num"] == 1
    assert killed["error"].startswith("UncompletedJobError: Job 4000_1") and "oom-kill" in killed["error"]
    rows = summary_rows(sweep)
    assert [(r["prompt.sp_kwargs.max_tokens"], r["status"]) for r in rows] == [("3", "ok"), ("4", "failed")]
    assert "oom-kill" in rows[1]["error"]


@pytest.mark.parametrize("argv,message", [
    (["hydra.launcher.nodes=2", "args.world_size=4"], "starts nodes x tasks_per_node = 8 ranks"),
    (["args.world_size=1,2"], "but hydra.launcher.gpus_per_node=1; set hydra.launcher.gpus_per_node=2"),
], ids=["ranks_mismatch", "world_size_swept"])
def test_resources_are_checked_before_anything_is_submitted(tmp_path, slurm, argv, message):
    state, env = slurm
    proc = launch(tmp_path, "-m", "hydra/launcher=slurm", *argv, f"hydra.sweep.dir={tmp_path / 'sweep'}", env=env)
    assert proc.returncode == 2 and "Error: job #" in proc.stderr and message in proc.stderr, show(proc)
    assert "Traceback" not in proc.stderr  # one line, as for any other mistake of the user's
    assert not list(state.glob("sbatch_*.sh"))


def test_missing_launcher_plugin_is_a_one_line_error(monkeypatch):
    import importlib.util

    from autodeploy.config import ConfigError, to_overrides

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hydra_plugins.hydra_submitit_launcher" else real(name, *a))
    with pytest.raises(ConfigError, match=r"hydra/launcher=slurm needs the slurm extra: pip install 'autodeploy\[slurm\]'"):
        to_overrides(["hydra/launcher=slurm"])
    to_overrides(["hydra/launcher=basic"])  # Hydra's own launcher needs nothing


def test_slurm_off_the_cluster_is_one_line(tmp_path):
    """No srun here (no fake SLURM on PATH): one line naming what is missing, not submitit's traceback."""
    proc = launch(tmp_path, "-m", "hydra/launcher=slurm", "args.max_batch_size=1,2", f"hydra.sweep.dir={tmp_path / 's'}",
                  env={"PATH": os.path.dirname(os.sys.executable) + os.pathsep + "/usr/bin:/bin"})
    assert proc.returncode == 2, show(proc)
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: hydra/launcher=slurm submits jobs with sbatch and srun")
    assert "Traceback" not in proc.stderr and "Could not detect" not in proc.stderr


def test_local_launcher_on_a_cpu_machine_needs_no_gpu_settings(tmp_path):
    """args.device=auto on a machine without CUDA runs on the CPU: a swept world size needs no gpus_per_node."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU: auto means cuda there")
    sweep = tmp_path / "sweep"
    proc = launch(tmp_path, "-m", "hydra/launcher=local", "model=tiny_llama", "args.world_size=1,2", "dry_run=true",
                  f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, show(proc)
    assert "gpus_per_node" not in proc.stderr
    for job in ("0", "1"):  # both dry runs ran (a dry-run sweep writes no summary)
        assert (sweep / job / ".hydra" / "config.yaml").exists() and not (sweep / job / "failure.json").exists()
