"""Experiment configuration: schema, seed-style flags, yaml_extra precedence, composition."""

from __future__ import annotations

from typing import Iterable

from omegaconf import DictConfig

from .cli import CONF_DIR, config_groups, split_argv, translate_argv, validate_override_keys
from .errors import ConfigError
from .resolve import group_overrides, resolve_experiment, validate_transforms
from .schema import ExperimentConfig, register_configs

__all__ = [
    "CONF_DIR", "ConfigError", "ExperimentConfig", "compose_experiment", "register_configs",
    "group_overrides", "resolve_experiment", "split_argv", "translate_argv", "validate_override_keys", "validate_transforms",
]


def compose_experiment(
    overrides: Iterable[str] = (),
    *,
    config_name: str = "config",
    config_dir: str | None = None,
    extra_layer: dict | None = None,
    check_transforms: bool = True,
    with_hydra: bool = False,
) -> DictConfig:
    """Compose and resolve an experiment in-process (tests, the LLM API, ``--cfg job``).

    ``overrides`` may mix Hydra overrides and seed-style flags; ``extra_layer`` is a nested dict
    applied at command-line precedence (the LLM API's keyword arguments). ``config_dir`` is
    Hydra's ``--config-dir``: an extra config folder (e.g. ``sweeps/``) searched before ours.
    ``with_hydra`` keeps Hydra's own node under ``hydra`` (``--cfg hydra``).
    """
    import os
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register_configs()
    translated = translate_argv(list(overrides))
    validate_override_keys(translated)
    # Hydra finds the primary config in the initialized folder only; the other one is searched
    primary, extra = str(CONF_DIR), config_dir and os.path.abspath(config_dir)
    if extra and os.path.isfile(os.path.join(extra, f"{config_name}.yaml")):
        primary, extra = extra, primary
    search = [f"hydra.searchpath=[file://{extra}]"] if extra else []
    groups = group_overrides(translated, config_groups())
    try:
        if GlobalHydra.instance().is_initialized():
            cli = hydra.compose(config_name, overrides=translated, return_hydra_config=with_hydra)
            defaults = hydra.compose(config_name, overrides=groups)
        else:
            with hydra.initialize_config_dir(config_dir=primary, version_base="1.3", job_name="autodeploy"):
                cli = hydra.compose(config_name, overrides=search + translated, return_hydra_config=with_hydra)
                defaults = hydra.compose(config_name, overrides=search + groups)
    except HydraException as e:
        cause = f"\n{e.__cause__}" if e.__cause__ is not None else ""
        raise ConfigError(f"{e}{cause}") from None
    cfg = resolve_experiment(cli, defaults, translated, extra_layer=extra_layer)
    if check_transforms:
        validate_transforms(cfg)
    if with_hydra:
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.hydra = cli.hydra
    return cfg
