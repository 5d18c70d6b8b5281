"""``python launch.py ...``: translate seed flags, compose with Hydra, resolve, run.

``--cfg job`` is answered here (not by Hydra) so it prints the *final* config: yaml_extra files
merged, seed flags applied, shortcuts synced. Every other Hydra flag works as Hydra documents.

A mistake of the user's (``UserError``: config, model path, checkpoint, bad values) prints one
line, ``Error: ...``, and exits with code 2, before any model work where it can be known then; a
traceback only with ``HYDRA_FULL_ERROR=1`` or ``hydra.verbose=true``. In a multirun the error is
raised so the sweep records the job as failed. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from autodeploy.config import ConfigError, compose_experiment, find_user_error, hydra_app, register_configs, to_overrides
from autodeploy.config.cli import flag_value, split_argv, translate_argv

log = logging.getLogger("autodeploy")

# flags that answer something about the app instead of running it
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc")


def main(argv: list[str] | None = None) -> None:
    from autodeploy.distributed.env import serve_if_worker

    if serve_if_worker():  # torchrun / srun started this process as a worker: rank 0 composes and sends the config
        # done: its process group is destroyed and rank 0 told. Leave without the interpreter's
        # teardown, where C++ threads of torch's libraries are destroyed at random (the suspected
        # source of a rare "terminate called without an active exception" abort of this rank in CI)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    if _answer_completion(argv):
        return
    overrides: list[str] = []
    try:
        if argv[:1] == ["serve"]:
            argv = serve_argv(argv[1:])
        flags, overrides = split_argv(translate_argv(argv))
        name, where = flag_value(flags, "--config-name", "-cn") or "config", flag_value(flags, "--config-dir", "-cd")
        if any(f.split("=")[0] in _INFO_FLAGS for f in flags):
            pass  # Hydra answers
        elif flag_value(flags, "--cfg", "-c") == "hydra":  # also with -m, which Hydra refuses
            _print_hydra_config(flags, compose_experiment(argv, config_name=name, config_dir=where, with_hydra=True,
                                                          check_transforms=False))
            return
        elif _is_multirun(flags):  # Hydra runs the sweep; each job's config is Hydra's composition
            flags, overrides, _ = to_overrides(argv, multirun=True)
        elif flag_value(flags, "--cfg", "-c") == "job":
            _print_job_config(flags, compose_experiment(argv, config_name=name, config_dir=where))
            return
        elif _run_once(argv, name, where):
            return
        else:  # the config asks for a multirun (a sweep file): Hydra runs it, as with -m
            flags, overrides, _ = to_overrides(argv, multirun=True)
    except Exception as e:  # noqa: BLE001 - a user's mistake exits 2; anything else is re-raised
        _exit_if_user_error(e, overrides)
        raise
    sys.argv = [sys.argv[0]] + flags + overrides
    _hydra_entry()
    _exit_if_jobs_failed()


def _run_once(argv: list[str], config_name: str, config_dir: str | None) -> bool:
    """A single run: compose once (every config error now, before a run folder exists), then run the
    job in Hydra's run folder with Hydra's logging, as ``@hydra.main`` would. False: the config asks
    for a multirun (a sweep file), which Hydra runs."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext, RunMode

    with hydra_app(config_name, config_dir):
        cfg = compose_experiment(argv, config_name=config_name, config_dir=config_dir, with_hydra=True)
        if cfg.hydra.mode == RunMode.MULTIRUN:
            return False
        cfg.hydra.mode = RunMode.RUN
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
        callbacks = Callbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name=config_name)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=callbacks)
        ret = run_job(hydra_context=context, task_function=lambda task: _job(task, resolved=True), config=cfg,
                      job_dir_key="hydra.run.dir", job_subdir_key=None, configure_logging=True)
        callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
    ret.return_value  # noqa: B018 - raises the job's exception
    return True


# `autodeploy serve` flags that vLLM users type -> ours (every launch.py flag works too)
SERVE_FLAGS = {
    "--host": "server.host", "--port": "server.port", "--served-model-name": "server.served_model_name",
    "--api-key": "server.api_key", "--tensor-parallel-size": "args.world_size", "-tp": "args.world_size",
    "--max-model-len": "args.max_seq_len", "--max-num-seqs": "args.max_batch_size",
}


def serve_argv(argv: list[str]) -> list[str]:
    """``autodeploy serve [MODEL] [flags]`` -> ``server=openai [--model MODEL] [flags]``."""
    out = ["server=openai"]
    i = 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        if flag in SERVE_FLAGS:
            if not eq and i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a value")
            value = inline if eq else argv[i + 1]
            out.append(f"--{SERVE_FLAGS[flag]}={value}")  # quoted by translate_argv like any seed flag
            i += 1 if eq else 2
            continue
        if i == 0 and not argv[i].startswith("-") and "=" not in argv[i]:
            out += ["--model", argv[i]]  # the model, as `vllm serve MODEL`
        else:
            out.append(argv[i])
        i += 1
    return out


def _exit_if_jobs_failed() -> None:
    """After a multirun: the summary is written; a failed job makes the exit status non-zero."""
    from autodeploy.sweep.callback import last_summary

    summary = last_summary()
    if summary is not None and summary.failed:
        print(f"Error: {len(summary.failed)} of {len(summary.rows)} jobs failed; see {summary.sweep_dir / 'summary.md'}",
              file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_entry(cli_cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:  # a failed job is recorded in its folder; the others run
        from autodeploy.sweep.jobs import run_isolated

        return run_isolated(lambda: _job(cli_cfg), hc.runtime.output_dir, list(hc.overrides.task), hc.job.num)
    return _job(cli_cfg)


def _job(cfg: DictConfig, resolved: bool = False):
    """One job: ``cfg`` is final (``resolved``, a single run) or Hydra's composition of a sweep's job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from autodeploy.config import finalize, validate_transforms
    from autodeploy.tracking import check_logger

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    try:
        if not resolved:
            finalize(cfg)
            validate_transforms(cfg)
        check_logger(cfg.logger)
        from autodeploy.config import experiment
        from autodeploy.run import run

        return run(experiment(cfg), output_dir=hc.runtime.output_dir)
    except Exception as e:  # noqa: BLE001 - a user's mistake exits 2; anything else is re-raised
        if hc.mode != RunMode.MULTIRUN:
            _exit_if_user_error(e, overrides, verbose=bool(hc.verbose), logged=True)
        raise


def _exit_if_user_error(e: BaseException, overrides: list[str], verbose: bool = False, logged: bool = False) -> None:
    """Print a user's mistake as one line and exit 2 (unless a traceback was asked for); else return.
    ``logged``: also into the run's log (inside Hydra's job, where logging writes to the run folder)."""
    error = find_user_error(e)
    verbose = verbose or any(o.split("=")[0] == "hydra.verbose" and o.split("=", 1)[1] not in ("false", "False", "[]")
                             for o in overrides if "=" in o)
    if error is None or verbose or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    message = one_line(error)
    if logged:  # into the run's log file only: the terminal gets the one line below
        from autodeploy.run import to_log_file

        to_log_file(logging.ERROR, message)
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(2)


def one_line(error: BaseException) -> str:
    """The message on one line, without OmegaConf's full_key/reference_type/object_type lines."""
    noise = ("full_key:", "reference_type", "object_type")
    lines = [line.strip() for line in str(error).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(noise))


def _answer_completion(argv: list[str]) -> bool:
    """Answer a tab-completion query whose word is a seed-style flag; else make the line Hydra's."""
    if not any(a in ("-sc", "--shell-completion") for a in argv) or not any(a.startswith("query=") for a in argv):
        return False
    from hydra.plugins.completion_plugin import CompletionPlugin

    from autodeploy.config.completion import complete

    line = os.environ.get("COMP_LINE", "")
    try:
        args_line = CompletionPlugin.strip_python_or_app_name(line)
    except RuntimeError:
        return False
    candidates, hydra_line = complete(args_line)
    if candidates is not None:
        print(" ".join(candidates))
        return True
    os.environ["COMP_LINE"] = line[: len(line) - len(args_line)] + hydra_line
    return False


def _is_multirun(flags: list[str]) -> bool:
    return "-m" in flags or "--multirun" in flags


def _print_job_config(flags: list[str], cfg: DictConfig) -> None:
    package, resolve = flag_value(flags, "--package", "-p"), "--resolve" in flags
    if package:
        node = OmegaConf.select(cfg, package)
        print(f"# @package {package}")
        print(OmegaConf.to_yaml(node, resolve=resolve) if isinstance(node, DictConfig) else node)
    else:
        print(OmegaConf.to_yaml(cfg, resolve=resolve), end="")


def _print_hydra_config(flags: list[str], cfg: DictConfig) -> None:
    """``--cfg hydra`` (also with ``-m``, which Hydra refuses): Hydra's node composed with the
    experiment, so ``--resolve`` can fill values such as the launcher's ``${args.world_size}``."""
    node = _resolve_what_can_be(cfg, "hydra") if "--resolve" in flags else cfg.hydra
    print(OmegaConf.to_yaml(OmegaConf.create({"hydra": node})), end="")


def _resolve_what_can_be(cfg: DictConfig, path: str):
    """Resolved values where they resolve now; job-time ones (``${hydra.runtime...}``) stay as written."""

    def walk(value, at: str):
        if isinstance(value, dict):
            return {k: walk(v, f"{at}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{at}.{i}") for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            try:
                resolved = OmegaConf.select(cfg, at, throw_on_missing=True)
            except Exception:
                return value
            return OmegaConf.to_container(resolved, resolve=True) if OmegaConf.is_config(resolved) else resolved
        return value

    return walk(OmegaConf.to_container(OmegaConf.select(cfg, path), resolve=False), path)


if __name__ == "__main__":
    main()
