"""autodeploy's submitit launchers (``hydra/launcher=local`` / ``slurm``): a dead job is recorded, not fatal.

hydra-submitit-launcher returns ``[job.results()[0] for job in jobs]``: the first job whose process
died (OOM kill, timeout, a crashed rank) raises and the sweep ends without its summary. These
launchers collect every job, write ``failure.json`` for each one that died, and check before
submitting that each job's ``args.world_size`` matches the ranks the launcher starts.

``array_parallelism`` is the number of jobs running at once on both: SLURM's array throttle, and
for ``local`` a window of processes (default 1, so benchmarks never share a GPU).

Hydra only instantiates launchers from the ``hydra_plugins`` package, and imports every module in
it at start-up: this one registers the schemas ``hydra/launcher/autodeploy_{local,slurm}`` that the
presets in ``autodeploy/conf/hydra/launcher/`` extend, and defines nothing without the slurm extra.
"""

# no `from __future__ import annotations`: Hydra runs this module before it is in sys.modules,
# where dataclasses cannot resolve string annotations
import logging
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf, open_dict

from autodeploy.sweep.jobs import RESULTS_FILE, record_failure

log = logging.getLogger("autodeploy")

try:  # the `slurm` extra
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
except ImportError:  # pragma: no cover - exercised only without the extra
    BaseSubmititLauncher = None

OWN_KEYS = {"array_parallelism"}  # ours on `local`; not a submitit parameter there


@dataclass
class _Job:
    num: int
    overrides: list[str]
    dir: Path
    world_size: int
    device: str


if BaseSubmititLauncher is not None:

    @dataclass
    class LocalConf(LocalQueueConf):
        _target_: str = "hydra_plugins.autodeploy_launcher.autodeploy_launcher.LocalLauncher"
        array_parallelism: int = 1

    @dataclass
    class SlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.autodeploy_launcher.autodeploy_launcher.SlurmLauncher"

    class _TolerantLauncher(BaseSubmititLauncher):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
            assert self.config is not None and self.hydra_context is not None
            from hydra.core.singleton import Singleton
            from hydra.core.utils import filter_overrides

            jobs = [self._job(initial_job_idx + i, list(ov)) for i, ov in enumerate(job_overrides)]
            for problem in [self._machine_problem()] + [self._rank_problem(job) for job in jobs]:
                if problem:  # a user's mistake: one line and exit 2, as the command line does
                    print(f"Error: {problem}", file=sys.stderr)
                    sys.exit(2)
            executor = self._executor()
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            log.info("submitit %s sweep: %d jobs into %s", self._EXECUTOR, len(jobs), sweep_dir)
            args = []
            for job in jobs:
                log.info("\t#%d : %s", job.num, " ".join(filter_overrides(job.overrides)))
                args.append((job.overrides, "hydra.sweep.dir", job.num, f"job_id_for_{job.num}", Singleton.get_state()))
            return self._run(executor, jobs, args)

        def _run(self, executor: Any, jobs: list[_Job], args: list[tuple]) -> list[Any]:
            submitted = executor.map_array(self, *zip(*args))
            return [self._outcome(s, job) for s, job in zip(submitted, jobs)]

        def _outcome(self, submitted: Any, job: _Job) -> Any:
            """The job's JobReturn; for a job whose process died, a recorded failure instead."""
            from hydra.core.utils import JobReturn, JobStatus

            try:
                return submitted.results()[0]
            except Exception as error:  # the process died, timed out, or a worker rank failed
                record = record_failure(job.dir, error, job.overrides, job.num, source="launcher")
                had_results = (job.dir / RESULTS_FILE).exists()
                log.error("job %d failed: %s%s", job.num, record["error"],
                          " (rank 0 had written its results)" if had_results else "")
                # COMPLETED, so Hydra's sweeper goes on to the summary; failure.json says what happened
                return JobReturn(overrides=job.overrides, status=JobStatus.COMPLETED, _return_value=record)

        def _job(self, num: int, overrides: list[str]) -> _Job:
            """The job's folder and rank count, as its own process will compose them."""
            from hydra.core.hydra_config import HydraConfig

            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num
                cfg.hydra.job.id = f"job_id_for_{num}"
            previous = HydraConfig.instance().cfg
            HydraConfig.instance().set_config(cfg)  # the folder's name may use ${hydra:...}
            try:
                job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            finally:
                if previous is not None:
                    HydraConfig.instance().cfg = previous
            return _Job(num, overrides, job_dir, int(OmegaConf.select(cfg, "args.world_size", default=1) or 1),
                        str(OmegaConf.select(cfg, "args.device", default="auto")))

        def _machine_problem(self) -> str | None:
            """What this machine lacks to submit at all (SLURM's commands), before any job is made."""
            import shutil

            if self._EXECUTOR == "slurm" and shutil.which("srun") is None:
                return ("hydra/launcher=slurm submits jobs with sbatch and srun, which this machine does not have: "
                        "run the sweep on the cluster's login node, or use hydra/launcher=local on this machine")
            return None

        def _device(self, job: _Job) -> str:
            """The job's device: ``auto`` is decided here for ``local`` (its jobs run on this machine)."""
            if job.device == "auto" and self._EXECUTOR == "local":
                import torch

                return "cuda" if torch.cuda.is_available() else "cpu"
            return job.device

        def _rank_problem(self, job: _Job) -> str | None:
            """Resources are fixed for the whole sweep: a job whose world size disagrees is refused
            before anything is submitted, instead of hanging or sharing GPUs on the cluster."""
            p = self.params
            ranks = int(p.get("nodes") or 1) * int(p.get("tasks_per_node") or 1)
            gpus = p.get("gpus_per_node")
            what = f"job #{job.num} ({' '.join(job.overrides) or 'no overrides'}) has args.world_size={job.world_size}"
            if ranks > 1 and ranks != job.world_size:
                return (f"{what} but hydra/launcher={self._EXECUTOR} starts nodes x tasks_per_node = {ranks} ranks; "
                        f"set hydra.launcher.tasks_per_node=<world_size / nodes> (launcher resources cannot vary "
                        f"within one sweep: run one sweep per world size)")
            if ranks == 1 and job.world_size > 1 and self._device(job) != "cpu" and gpus and gpus < job.world_size:
                return (f"{what}, spawned on one node, but hydra.launcher.gpus_per_node={gpus}; "
                        f"set hydra.launcher.gpus_per_node={job.world_size} (or args.device=cpu)")
            return None

        def _executor(self) -> Any:
            import submitit
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

            params = {k: v for k, v in self.params.items() if not (k in OWN_KEYS and self._EXECUTOR == "local")}
            init = {"folder": params.pop("submitit_folder")}
            if "max_num_timeout" in params:
                init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
            shared = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
            return executor

    class SlurmLauncher(_TolerantLauncher):
        _EXECUTOR = "slurm"

    class LocalLauncher(_TolerantLauncher):
        """One process per job, at most ``array_parallelism`` at once (GPU state never leaks)."""

        _EXECUTOR = "local"

        def _run(self, executor: Any, jobs: list[_Job], args: list[tuple]) -> list[Any]:
            window = max(1, int(self.params.get("array_parallelism") or 1))
            running: deque = deque()
            outcomes = []
            for job, job_args in zip(jobs, args):
                if len(running) >= window:
                    outcomes.append(self._outcome(*running.popleft()))
                running.append((executor.submit(self, *job_args), job))
            while running:
                outcomes.append(self._outcome(*running.popleft()))
            return outcomes


if BaseSubmititLauncher is not None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="hydra/launcher", name="autodeploy_local", node=LocalConf, provider="autodeploy")
    ConfigStore.instance().store(group="hydra/launcher", name="autodeploy_slurm", node=SlurmConf, provider="autodeploy")
