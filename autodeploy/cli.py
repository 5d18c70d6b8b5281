"""``python launch.py ...``: translate seed flags, compose with Hydra, resolve, run.

``--cfg job`` is answered here (not by Hydra) so it prints the *final* config: yaml_extra files
merged, seed flags applied, shortcuts synced. Every other Hydra flag works as Hydra documents.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from autodeploy.config import (
    ConfigError,
    compose_experiment,
    config_groups,
    group_overrides,
    register_configs,
    resolve_experiment,
    split_argv,
    translate_argv,
    validate_override_keys,
    validate_transforms,
)

log = logging.getLogger("autodeploy")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    try:
        flags, overrides = split_argv(translate_argv(argv))
        completing = any(f in ("-sc", "--shell-completion") for f in flags)
        if not completing:
            validate_override_keys(overrides)
            _check_launcher(overrides)
        if _wants_job_config(flags):
            _print_job_config(flags, overrides)
            return
        if _cfg_flag(flags) == "hydra":
            _print_hydra_config(flags, overrides)
            return
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0]] + flags + overrides
    _hydra_entry()
    _exit_if_jobs_failed()


def _check_launcher(overrides: list[str]) -> None:
    """The submitit presets need the plugin: one line that says so, instead of Hydra's lookup error."""
    import importlib.util

    for ov in overrides:
        key, _, value = ov.partition("=")
        if key.lstrip("+") == "hydra/launcher" and value in ("local", "slurm"):
            if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
                raise ConfigError(f"hydra/launcher={value} needs the slurm extra: pip install 'autodeploy[slurm]'")


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


def _job(cli_cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from autodeploy.tracking import check_logger

    hc = HydraConfig.get()
    try:
        overrides = list(hc.overrides.task)
        defaults = hydra.compose(hc.job.config_name, overrides=group_overrides(overrides, config_groups()))
        cfg = resolve_experiment(cli_cfg, defaults, overrides)
        validate_transforms(cfg)
        check_logger(cfg.logger)
    except ConfigError as e:
        if hc.mode == RunMode.MULTIRUN:
            raise  # recorded as this job's failure
        log.error("%s", e)
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.dry_run:
        print_dry_run(cfg)
        return None
    from autodeploy.run import run

    return run(cfg, output_dir=hc.runtime.output_dir)


def _wants_job_config(flags: list[str]) -> bool:
    if "-m" in flags or "--multirun" in flags:
        return False
    for i, f in enumerate(flags):
        if f in ("--cfg", "-c") and i + 1 < len(flags) and flags[i + 1] == "job":
            return True
        if f in ("--cfg=job", "-c=job"):
            return True
    return False


def _cfg_flag(flags: list[str]) -> str | None:
    return _flag_value(flags, "--cfg", "-c")


def _flag_value(flags: list[str], *names: str) -> str | None:
    for i, f in enumerate(flags):
        for n in names:
            if f == n and i + 1 < len(flags):
                return flags[i + 1]
            if f.startswith(n + "="):
                return f.split("=", 1)[1]
    return None


def _print_job_config(flags: list[str], overrides: list[str]) -> None:
    config_name = _flag_value(flags, "--config-name", "-cn") or "config"
    config_dir = _flag_value(flags, "--config-dir", "-cd")
    cfg = compose_experiment(overrides, config_name=config_name, config_dir=config_dir)
    package = _flag_value(flags, "--package", "-p")
    resolve = "--resolve" in flags
    if package:
        node = OmegaConf.select(cfg, package)
        print(f"# @package {package}")
        print(OmegaConf.to_yaml(node, resolve=resolve) if isinstance(node, DictConfig) else node)
    else:
        print(OmegaConf.to_yaml(cfg, resolve=resolve), end="")


def _print_hydra_config(flags: list[str], overrides: list[str]) -> None:
    """``--cfg hydra`` (also with ``-m``, which Hydra refuses): Hydra's node composed with the
    experiment, so ``--resolve`` can fill values such as the launcher's ``${args.world_size}``."""
    config_name = _flag_value(flags, "--config-name", "-cn") or "config"
    config_dir = _flag_value(flags, "--config-dir", "-cd")
    cfg = compose_experiment(overrides, config_name=config_name, config_dir=config_dir, with_hydra=True,
                             check_transforms=False)  # only Hydra's node is shown
    node = cfg.hydra
    if "--resolve" in flags:
        node = _resolve_what_can_be(cfg, "hydra")
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


def print_dry_run(cfg: DictConfig) -> None:
    """The final config and the pipeline that would run, without touching a model."""
    from autodeploy.transforms.optimizer import plan_pipeline

    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    print("# pipeline (stage order; disabled transforms are listed but skipped)")
    for name, tcfg in plan_pipeline(OmegaConf.to_container(cfg.args.transforms, resolve=True)):
        state = "" if tcfg.enabled else "  [disabled]"
        print(f"#   {tcfg.stage:<16} {name}{state}")


if __name__ == "__main__":
    main()
