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
    from autodeploy.distributed.env import detect

    rank_env = detect()
    if rank_env is not None and rank_env.rank > 0:
        # torchrun / srun started this process as a worker rank: rank 0 composes the config and sends it
        from autodeploy.distributed.ranks import worker_main

        worker_main(rank_env)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    try:
        flags, overrides = split_argv(translate_argv(argv))
        completing = any(f in ("-sc", "--shell-completion") for f in flags)
        if not completing:
            validate_override_keys(overrides)
        if _wants_job_config(flags):
            _print_job_config(flags, overrides)
            return
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0]] + flags + overrides
    _hydra_entry()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_entry(cli_cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    try:
        overrides = list(hc.overrides.task)
        defaults = hydra.compose(hc.job.config_name, overrides=group_overrides(overrides, config_groups()))
        cfg = resolve_experiment(cli_cfg, defaults, overrides)
        validate_transforms(cfg)
    except ConfigError as e:
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
