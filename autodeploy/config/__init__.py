"""Experiment configuration: the seed's syntax as Hydra overrides (cli.py), one composition, checks."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator

from omegaconf import DictConfig

from .cli import CONF_DIR, config_groups, model_cards, split_argv, to_overrides, translate_argv
from .errors import ConfigError, UserError, find_user_error
from .preflight import preflight
from .resolve import finalize, validate_transforms
from .schema import AutoDeployArgs, ExperimentConfig, register_configs

__all__ = [
    "AutoDeployArgs", "CONF_DIR", "ConfigError", "ExperimentConfig", "experiment", "UserError", "compose_experiment", "config_groups", "finalize",
    "find_user_error", "hydra_app", "model_cards", "preflight", "register_configs", "split_argv", "to_overrides",
    "translate_argv", "validate_transforms",
]


_search: list[str] = []  # the search-path override of the app hydra_app initialized


def experiment(cfg: DictConfig) -> ExperimentConfig:
    """The composed config as typed objects (``ExperimentConfig``, plain dicts for transforms): the one
    conversion, where a run, the ``LLM`` API or a sweep's job starts."""
    from omegaconf import OmegaConf, open_dict

    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    return OmegaConf.to_object(cfg)


@contextmanager
def hydra_app(config_name: str = "config", config_dir: str | None = None) -> Iterator[list[str]]:
    """Hydra initialized on ``conf/`` (and ``config_dir``, Hydra's ``--config-dir``), unless it is
    already (inside a running app); yields the search-path override that the extra folder needs."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    primary, extra = str(CONF_DIR), config_dir and os.path.abspath(config_dir)
    if extra and os.path.isfile(os.path.join(extra, f"{config_name}.yaml")):
        primary, extra = extra, primary  # Hydra finds the primary config in the initialized folder only
    if GlobalHydra.instance().is_initialized():
        yield _search
        return
    with hydra.initialize_config_dir(config_dir=primary, version_base="1.3", job_name="autodeploy"):
        _search[:] = [f"hydra.searchpath=[file://{extra}]"] if extra else []
        try:
            yield _search
        finally:
            _search.clear()


def compose_experiment(
    overrides: Iterable[str] = (), *, config_name: str = "config", config_dir: str | None = None,
    extra_layer: dict | None = None, check_transforms: bool = True, with_hydra: bool = False,
) -> DictConfig:
    """The one composition: seed flags, files and overrides -> the final, checked experiment config.

    ``overrides`` may mix Hydra overrides and seed-style flags; ``extra_layer`` is a nested dict at
    command-line precedence (the LLM API's keyword arguments). ``with_hydra`` keeps Hydra's node.
    """
    import hydra
    from hydra.errors import ConfigCompositionException, HydraException

    _, ordered, sources = to_overrides(list(overrides), extra_layer, config_dir)
    with hydra_app(config_name, config_dir) as search:
        try:
            cfg = hydra.compose(config_name, overrides=search + ordered, return_hydra_config=with_hydra)
        except ConfigCompositionException as e:  # a value that does not fit its key: name where it came from
            line = str(e).removeprefix("Error merging override ")
            cause = str(e.__cause__).splitlines()[0] if e.__cause__ is not None else ""
            if line in sources and cause:
                source = "" if sources[line] == "command line" else f"{sources[line]}: "
                key = line.split("=", 1)[0].lstrip("+~")
                raise ConfigError(f"{source}bad value for '{key}': {cause}") from None
            raise ConfigError(f"{e}" + (f" {cause}" if cause else "")) from None
        except HydraException as e:
            raise ConfigError(f"{e}" + (f" {e.__cause__}" if e.__cause__ is not None else "")) from None
    finalize(cfg)
    if check_transforms:
        validate_transforms(cfg)
    return cfg
