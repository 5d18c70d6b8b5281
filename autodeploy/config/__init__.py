"""Experiment configuration: schema, seed-style flags, yaml_extra precedence, composition."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Iterable

from omegaconf import DictConfig

from .cli import CONF_DIR, config_groups, split_argv, translate_argv, validate_override_keys
from .errors import ConfigError, UserError, find_user_error
from .preflight import preflight
from .resolve import group_overrides, resolve_experiment, validate_transforms
from .schema import ExperimentConfig, register_configs

__all__ = [
    "CONF_DIR", "ConfigError", "ExperimentConfig", "UserError", "compose_experiment", "find_user_error",
    "preflight", "register_configs", "group_overrides", "resolve_experiment", "split_argv", "translate_argv",
    "validate_override_keys", "validate_transforms",
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
    initialized = GlobalHydra.instance().is_initialized()  # inside a running app: use its search path
    search = [f"hydra.searchpath=[file://{extra}]"] if extra and not initialized else []
    groups = group_overrides(translated, config_groups())

    def compose(overrides: list[str], with_hydra: bool = False) -> DictConfig:
        try:
            return hydra.compose(config_name, overrides=overrides, return_hydra_config=with_hydra)
        except HydraException as e:
            cause = f"\n{e.__cause__}" if e.__cause__ is not None else ""
            raise ConfigError(f"{e}{cause}") from None

    with ExitStack() as stack:
        if not initialized:
            stack.enter_context(
                hydra.initialize_config_dir(config_dir=primary, version_base="1.3", job_name="autodeploy")
            )
        cli = compose(search + translated, with_hydra)
        cfg = resolve_experiment(
            cli, compose(search + groups), translated, extra_layer=extra_layer,
            compose_defaults=lambda choice: compose(search + groups + [choice]),
        )
    if check_transforms:
        validate_transforms(cfg)
    if with_hydra:
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.hydra = cli.hydra
    return cfg
