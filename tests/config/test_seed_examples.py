"""Every command and YAML example of the seed document, with launch.py for build_and_run_ad.py.

Hub ids are replaced by cards (Llama-3.1-8B -> llama3_8b, the others -> tiny_llama). These tests
check the resolved configuration; tests/test_end_to_end.py runs the runnable ones for real.
"""

from pathlib import Path

import pytest

from autodeploy.config import compose_experiment

SEED = Path(__file__).parent / "seed_files"


def f(name: str) -> str:
    return str(SEED / name)


def test_model_kwargs_and_tokenizer_kwargs():
    cfg = compose_experiment([
        "--model", "llama3_8b",
        "--args.model-kwargs.num-hidden-layers=10",
        "--args.model-kwargs.hidden-size=2048",
        "--args.tokenizer-kwargs.padding-side=left",
    ])
    assert dict(cfg.args.model_kwargs) == {"num_hidden_layers": 10, "hidden_size": 2048}
    assert dict(cfg.args.tokenizer_kwargs) == {"padding_side": "left"}
    assert cfg.model == "llama3_8b"


def test_runtime_and_backend_options():
    cfg = compose_experiment([
        "--model", "tiny_llama", "--args.world-size=2", "--args.compile-backend=torch-opt", "--args.attn-backend=flashinfer",
    ])
    assert cfg.args.world_size == 2
    assert cfg.args.compile_backend == cfg.args.transforms.compile_model.backend == "torch-opt"
    assert cfg.args.attn_backend == cfg.args.transforms.insert_cached_attention.backend == "flashinfer"


def test_prompting_and_benchmarking():
    cfg = compose_experiment([
        "--model", "tiny_llama", "--prompt.batch-size=4", "--prompt.sp-kwargs.max-tokens=200",
        "--prompt.sp-kwargs.temperature=0.7", "--benchmark.enabled=true", "--benchmark.bs=8", "--benchmark.isl=1024",
    ])
    assert cfg.prompt.batch_size == 4
    assert cfg.prompt.sp_kwargs.max_tokens == 200 and cfg.prompt.sp_kwargs.temperature == 0.7
    assert cfg.benchmark.enabled and cfg.benchmark.bs == 8 and cfg.benchmark.isl == 1024
    assert cfg.args.max_batch_size >= 8 and cfg.args.max_seq_len >= 1024 + cfg.benchmark.osl


def test_single_yaml_config():
    cfg = compose_experiment(["--model", "llama3_8b", "--yaml-extra", f("my_config.yaml")])
    a = cfg.args
    assert dict(a.model_kwargs) == {"num_hidden_layers": 12, "hidden_size": 1024}
    assert (a.world_size, a.max_seq_len, a.max_batch_size) == (4, 2048, 16)
    assert a.transforms.detect_sharding.support_partial_config is True
    assert a.attn_backend == "triton" and a.compile_backend == "torch-compile"
    sp = cfg.prompt.sp_kwargs
    assert cfg.prompt.batch_size == 8 and (sp.max_tokens, sp.temperature, sp.top_k) == (150, 0.8, 50)


def test_multiple_yaml_configs_later_wins():
    cfg = compose_experiment(["--model", "llama3_8b", "--yaml-extra", f("my_config.yaml"), f("production.yaml")])
    a = cfg.args
    assert (a.world_size, a.max_batch_size) == (8, 32)  # production.yaml
    assert a.compile_backend == "torch-opt"  # production.yaml
    assert a.attn_backend == "triton" and a.max_seq_len == 2048  # my_config.yaml siblings kept
    assert dict(a.model_kwargs) == {"num_hidden_layers": 12, "hidden_size": 1024}


def test_nested_args_yaml_extra():
    cfg = compose_experiment([
        "--model", "llama3_8b", "--yaml-extra", f("my_config.yaml"), "--args.yaml-extra", f("autodeploy_overrides.yaml"),
    ])
    a = cfg.args
    assert a.world_size == 4 and a.max_seq_len == 2048  # outer file beats the args-level file
    assert dict(a.model_kwargs) == {"num_hidden_layers": 12, "hidden_size": 1024, "intermediate_size": 512}
    plan = a.transforms.detect_sharding.manual_config
    assert plan.head_dim == 128 and plan.tp_plan.in_proj == "mamba" and plan.tp_plan.fc2_latent_proj == "gather"


def test_deep_merge_example():
    cfg = compose_experiment(["--yaml-extra", f("base_config.yaml"), f("override_config.yaml")])
    assert dict(cfg.args.model_kwargs) == {"num_hidden_layers": 10, "hidden_size": 2048}
    assert cfg.args.world_size == 4 and cfg.args.max_seq_len == 2048


def test_nested_config_behavior_cli_beats_both_yaml():
    cfg = compose_experiment([
        "--model", "llama3_8b", "--yaml-extra", f("experiment_config.yaml"),
        "--args.yaml-extra", f("autodeploy_overrides.yaml"), "--args.world-size=8",
    ])
    assert cfg.args.world_size == 8
    assert cfg.args.max_seq_len == 4096  # outer yaml over args-level yaml
    assert cfg.prompt.batch_size == 4


@pytest.mark.parametrize("simple", [True, False])
def test_sharding_parameters(tmp_path, simple):
    y = tmp_path / "sharding.yaml"
    y.write_text(
        "args:\n  transforms:\n    detect_sharding:\n"
        f"      simple_shard_only: {str(simple).lower()}\n"
        "      sharding_source: ['factory', 'manual']\n"
        "      support_partial_config: false\n"
        "      sharding_dims: ['tp', 'ep', 'ssm']\n"
        "      process_grid: {'ep': 2, 'tp': 2}\n"
        "      requires_shape_prop: false\n"
    )
    ds = compose_experiment(["--yaml-extra", str(y), "--args.world-size=4"]).args.transforms.detect_sharding
    assert ds.simple_shard_only is simple
    assert list(ds.sharding_source) == ["factory", "manual"] and ds.support_partial_config is False
    assert list(ds.sharding_dims) == ["tp", "ep", "ssm"]
    assert list(ds.process_grid.items()) == [("ep", 2), ("tp", 2)]
    assert ds.requires_shape_prop is False


def test_manual_tp_plan_yaml_verbatim(tmp_path):
    y = tmp_path / "manual.yaml"
    y.write_text("args:\n  transforms:\n    detect_sharding:\n      manual_config:\n        head_dim: 128\n"
                 "        tp_plan:\n          in_proj: mamba\n          out_proj: rowwise\n          q_proj: colwise\n"
                 "          k_proj: colwise\n          v_proj: colwise\n          o_proj: rowwise\n"
                 "          gate_proj: colwise\n          up_proj: colwise\n          down_proj: rowwise\n"
                 "          fc1_latent_proj: gather\n          fc2_latent_proj: gather\n")
    plan = compose_experiment(["--yaml-extra", str(y)]).args.transforms.detect_sharding.manual_config
    assert dict(plan.tp_plan) == {
        "in_proj": "mamba", "out_proj": "rowwise", "q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise",
        "o_proj": "rowwise", "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise",
        "fc1_latent_proj": "gather", "fc2_latent_proj": "gather",
    }


def test_transform_option_from_the_command_line():
    cfg = compose_experiment(["--model", "tiny_llama", "--args.transforms.export-to-gm.strict=true"])
    assert cfg.args.transforms.export_to_gm.strict is True
    assert cfg.args.transforms.export_to_gm.stage == "export"  # sibling kept


def test_built_in_default_file_lists_the_pipeline():
    from autodeploy.config import CONF_DIR
    import yaml

    default = yaml.safe_load((CONF_DIR / "transforms" / "default.yaml").read_text())
    for name in ("build_model", "export_to_gm", "detect_sharding", "insert_cached_attention", "compile_model"):
        assert "stage" in default[name]
