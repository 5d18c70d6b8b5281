"""Every option of every config group composes, validates and lands where it should."""

from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from autodeploy.config import CONF_DIR, ConfigError, compose_experiment

GROUPS = {
    "model": "model",
    "transforms": "args.transforms",
    "transforms/compile": "args.transforms.compile_model",
    "sharding": "args.transforms.detect_sharding",
    "backend": "args.transforms.insert_cached_attention",
    "prompt": "prompt",
    "benchmark": "benchmark",
    "logger": "logger",
    "server": "server",
    "experiment": None,
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_options():
    on_disk = {str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*") if p.is_dir() and "__" not in p.name}
    assert set(GROUPS) | {"hydra", "hydra/launcher"} == on_disk - {"local"}  # local/: git-ignored machine files
    for group in GROUPS:
        assert options(group), group


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_option_composes(group, option):
    cfg = compose_experiment([f"{group}={option}"], check_transforms=False)
    # the option file's own keys (minus Hydra's defaults list) show up at its package
    data = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
    data.pop("defaults", None)
    package = GROUPS[group]
    if group == "model":
        assert cfg.model == option and cfg.args.model == option
    for key, value in _leaves(data):
        if group in ("model", "experiment"):
            full = key  # @package _global_
        else:
            full = f"{package}.{key}"
        assert OmegaConf.select(cfg, full) == value or _raised_limit(cfg, full, value), (full, value)


def _raised_limit(cfg, key, value):
    # prompt/benchmark presets may raise args limits, never lower what a file set
    return key.startswith("args.max_") and OmegaConf.select(cfg, key) >= value


def _leaves(d, prefix=""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, path + ".")
        else:
            yield path, v


def test_compile_option_equals_shortcut():
    for option in options("transforms/compile"):
        cfg = compose_experiment([f"transforms/compile={option}"], check_transforms=False)
        assert cfg.args.transforms.compile_model.backend == option == cfg.args.compile_backend


def test_backend_option_equals_shortcut():
    for option in options("backend"):
        cfg = compose_experiment([f"backend={option}"], check_transforms=False)
        assert cfg.args.transforms.insert_cached_attention.backend == option == cfg.args.attn_backend


def test_experiments_override_groups():
    cfg = compose_experiment(["experiment=llama3_8b_latency"], check_transforms=False)
    assert cfg.model == "llama3_8b"
    assert cfg.args.compile_backend == "torch-opt" and cfg.args.attn_backend == "triton"
    assert cfg.benchmark.enabled and cfg.benchmark.bs == 1 and cfg.benchmark.isl == 1024
    # the benchmark needs isl + osl tokens: the limit is raised, never left too small
    assert cfg.args.max_seq_len >= 1024 + 128


@pytest.mark.parametrize("launcher,target", [("local", "LocalLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_presets(launcher, target):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from autodeploy.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_default_is_smollm2_and_pipeline_file_has_every_stage():
    cfg = compose_experiment([], check_transforms=False)
    assert cfg.model == "smollm2_135m"  # real weights (tests name tiny_llama where any model will do)
    stages = {t.stage for t in cfg.args.transforms.values()}
    assert {"factory", "export", "sharding", "weight_load", "cache_init", "compile"} <= stages


def test_seed_sharding_defaults():
    """detect_sharding carries exactly the seed's fields and defaults."""
    ds = compose_experiment([], check_transforms=False).args.transforms.detect_sharding
    assert ds.simple_shard_only is False
    assert list(ds.sharding_source) == ["manual", "factory", "heuristic"]
    assert ds.support_partial_config is True
    assert list(ds.sharding_dims) == ["tp", "ep", "bmm"]
    assert ds.process_grid is None and ds.requires_shape_prop is True


def test_process_grid_preset_keeps_key_order():
    grid = compose_experiment(["sharding=ep_tp_grid"], check_transforms=False).args.transforms.detect_sharding.process_grid
    assert list(grid.keys()) == ["ep", "tp"] and dict(grid) == {"ep": 2, "tp": 2}


def test_bad_option_names_the_group():
    with pytest.raises(ConfigError, match="transforms/compile"):
        compose_experiment(["transforms/compile=torch-fast"], check_transforms=False)


def test_conf_symlink_points_at_package_configs():
    root_conf = Path(__file__).resolve().parents[2] / "conf"
    assert root_conf.resolve() == CONF_DIR


SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"


@pytest.mark.parametrize("name", sorted(p.stem for p in SWEEPS.glob("*.yaml")))
def test_sweep_files_compose(name):
    """Each sweeps/<name>.yaml is a primary config over ours (python launch.py -cd sweeps -cn <name>):
    every value of every swept parameter composes one job, and each value changes that job's config."""
    base = compose_experiment([], config_name=name, config_dir=str(SWEEPS))
    assert base.args.transforms.compile_model.stage == "compile"  # the whole default pipeline is there
    params = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert params, f"{name}.yaml sweeps nothing"
    for key, values in params.items():
        sweep = OverridesParser.create().parse_overrides([f"{key}={values}"])[0]  # Hydra's own split
        values = list(sweep.sweep_string_iterator())
        jobs = [compose_experiment([f"{key}={v}"], config_name=name, config_dir=str(SWEEPS)) for v in values]
        if "/" in key or key in GROUPS:  # a group: every option gives a different job
            texts = [OmegaConf.to_yaml(job) for job in jobs]
            assert len(set(texts)) == len(values), f"{name}: some {key} options compose the same job"
        else:  # a key: the job has the swept value (a mapping: merged into the key's node)
            for job, value in zip(jobs, sweep.value().list):
                node = OmegaConf.select(job, key)
                if isinstance(value, dict):
                    assert {k: OmegaConf.to_container(node)[k] for k in value} == value, (name, key, value)
                else:
                    assert str(node) == str(value), (name, key, value)
