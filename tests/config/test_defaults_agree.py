"""Each default is written where a reader looks for it; where two places state one, they agree."""

import dataclasses

import yaml

from autodeploy.config import CONF_DIR
from autodeploy.transforms.interface import get_transform_class
from autodeploy.transforms.optimizer import plan_pipeline  # noqa: F401 - registers the transform library


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_pipeline_yaml_states_the_typed_configs_defaults():
    pipeline = yaml.safe_load((CONF_DIR / "transforms" / "default.yaml").read_text())
    differ = []
    for name, options in pipeline.items():
        defaults = _defaults(get_transform_class(name).config_class)
        differ += [(name, k, v, defaults[k]) for k, v in (options or {}).items() if k in defaults and defaults[k] != v]
    assert differ == []  # e.g. compile_model.backend was torch-compile in Python, auto in the YAML


def test_default_presets_only_name_the_pipeline_defaults():
    for group in ("sharding", "backend"):
        data = yaml.safe_load((CONF_DIR / group / "default.yaml").read_text()) if (CONF_DIR / group / "default.yaml").exists() else None
        assert not data, f"{group}/default.yaml repeats values that conf/transforms/default.yaml states"
