"""Bad configuration fails before any model work with a message that names the problem;
the CLI's Hydra features (help, completion) work as Hydra documents."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from autodeploy.config import ConfigError, compose_experiment, translate_argv

ROOT = Path(__file__).resolve().parents[2]


def cli(*argv, timeout=300, env=None):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)


@pytest.mark.parametrize("argv,needle", [
    (["args.world_sise=2"], "args.world_size"),
    (["--args.max-seq-lenn=9"], "args.max_seq_len"),
    (["prompt.sp_kwargs.max_token=3"], "prompt.sp_kwargs.max_tokens"),
    (["benchmark.enable=true"], "benchmark.enabled"),
])
def test_unknown_key_suggests_closest(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        compose_experiment(argv, check_transforms=False)


def test_unknown_key_in_yaml_names_file_and_suggestion(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("args:\n  max_batch_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        compose_experiment(["--yaml-extra", str(y)], check_transforms=False)
    assert str(y) in str(e.value) and "args.max_batch_size" in str(e.value)


def test_wrong_type_in_yaml_names_key(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("args:\n  world_size: two\n")
    with pytest.raises(ConfigError, match="args.world_size"):
        compose_experiment(["--yaml-extra", str(y)], check_transforms=False)


def test_wrong_type_on_cli_names_key_and_type():
    with pytest.raises(ConfigError, match=r"args\.max_batch_size[\s\S]*Integer|Integer[\s\S]*args\.max_batch_size"):
        compose_experiment(["args.max_batch_size=many"], check_transforms=False)


def test_missing_yaml_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        compose_experiment(["--yaml-extra", str(missing)], check_transforms=False)
    with pytest.raises(ConfigError, match="args.yaml_extra file not found"):
        compose_experiment(["--args.yaml-extra", str(missing)], check_transforms=False)


@pytest.mark.parametrize("argv,needle", [
    (["args.world_size=0"], "args.world_size=0 must be >= 1"),
    (["args.device=tpu"], "args.device"),
    (["prompt.sp_kwargs.top_p=0"], "top_p"),
    (["prompt.sp_kwargs.temperature=-1"], "temperature"),
    (["args.free_mem_ratio=1.5"], "free_mem_ratio"),
    (["logger.name=tensorboard"], "logger.name"),
])
def test_invalid_values(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        compose_experiment(argv, check_transforms=False)


def test_non_mapping_yaml_is_rejected(tmp_path):
    y = tmp_path / "list.yaml"
    y.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        compose_experiment(["--yaml-extra", str(y)], check_transforms=False)


def test_translation_rules():
    out = translate_argv([
        "--model", "tiny_mixtral", "--args.world-size=2", "--args.model-kwargs.num-hidden-layers", "10",
        "--yaml-extra", "a.yaml", "b.yaml", "--args.yaml-extra", "c.yaml", "--dry-run",
        "transforms/compile=torch-opt", "args.tokenizer_kwargs.padding_side=left", "--cfg", "job",
    ])
    assert out == [
        "model=tiny_mixtral", "args.model=tiny_mixtral", "args.world_size=2", "++args.model_kwargs.num_hidden_layers=10",
        "yaml_extra=['a.yaml','b.yaml']", "args.yaml_extra=['c.yaml']", "dry_run=true",
        "transforms/compile=torch-opt", "++args.tokenizer_kwargs.padding_side=left", "--cfg", "job",
    ]
    # a non-card model is a path or hub id and goes to args.model (the `model` key is a group)
    assert translate_argv(["--model", "/models/llama"]) == ["args.model=/models/llama"]
    assert translate_argv(["model=org/name"]) == ["args.model=org/name"]


def test_cli_unknown_key_exit_code_and_message():
    proc = cli("args.world_sise=2")
    assert proc.returncode == 2
    assert "Did you mean: args.world_size" in proc.stderr


def test_cli_help_lists_groups():
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    for group in ("model:", "transforms/compile:", "sharding:", "backend:", "prompt:", "benchmark:", "logger:",
                  "experiment:"):
        assert group in proc.stdout
    assert "torch-opt" in proc.stdout and "tiny_llama" in proc.stdout


def test_tab_completion_install_script():
    proc = cli("-sc", "install=bash")
    assert proc.returncode == 0, proc.stderr
    assert "hydra_bash_completion" in proc.stdout and "complete" in proc.stdout


def test_tab_completion_query_lists_group_options():
    # bash calls the app with COMP_LINE set to the line being completed
    env = dict(os.environ, COMP_LINE="python launch.py transforms/compile=torch-")
    proc = cli("-sc", "query=bash", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "transforms/compile=torch-opt" in proc.stdout.split()


def test_sampling_values_follow_the_python_apis_rule():
    """One rule for top_k in Python and on the command line: -1, 0 and null turn it off (vLLM's)."""
    from autodeploy.runtime.sampling_params import SamplingParams

    assert compose_experiment(["prompt.sp_kwargs.top_k=-1"]).prompt.sp_kwargs.top_k == -1
    SamplingParams(top_k=-1)
    with pytest.raises(ValueError) as python:
        SamplingParams(top_k=-2)
    with pytest.raises(ConfigError) as cli:
        compose_experiment(["prompt.sp_kwargs.top_k=-2"])
    assert str(cli.value) == f"prompt.sp_kwargs.{python.value}"


@pytest.mark.parametrize("argv,expected", [
    (["backend=trito"], "Error: backend=trito is not an option: did you mean triton? (options: flashinfer, torch, triton)"),
    (["sharding=tpp"], "Error: sharding=tpp is not an option: did you mean tp? (options: default, ep, ep_tp_grid, "
                       "hybrid_manual, replicate, simple, tp)"),
    (["--args.world-size=two"], "Error: bad value for 'args.world_size': Value 'two' of type 'str' could not be "
                                "converted to Integer"),
    (["model=tiny_lama", "--dry-run"], "Error: unknown model 'tiny_lama': did you mean tiny_llama? (cards: "
                                       "tiny_hybrid, tiny_llama, tiny_mixtral, smollm2_135m, llama3_70b, llama3_8b, "
                                       "mixtral_8x7b)"),
], ids=["group_option", "sharding_preset", "world_size_type", "model_typo"])
@pytest.mark.parametrize("mode", [["--cfg", "job"], []], ids=["cfg_job", "run"])
def test_new_users_mistakes_are_our_one_line(argv, expected, mode, capsys, tmp_path, monkeypatch):
    """Caught at compose, before a run folder or any model work: one line of ours, exit 2."""
    from autodeploy.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*argv, *mode])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [expected]
    assert not (tmp_path / "outputs").exists()


def test_a_plain_run_composes_once(capsys, tmp_path, monkeypatch):
    """`python launch.py ...` (a dry run here: the same path as a run up to the model) calls
    hydra.compose exactly once, and the job prints the plan for the world it was given."""
    import hydra

    from autodeploy.cli import main

    calls = []
    compose = hydra.compose
    monkeypatch.setattr(hydra, "compose", lambda *a, **k: calls.append(a) or compose(*a, **k))
    monkeypatch.chdir(tmp_path)
    main(["--model", "tiny_llama", "--args.world-size=2", "--dry-run"])
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert "world_size: 2" in out and "# sharding (world_size 2)" in out


def test_a_real_run_composes_once(tmp_path, monkeypatch):
    """The same count on a run that builds the model and generates (tiny_llama on the CPU)."""
    import json

    import hydra

    from autodeploy.cli import main

    calls = []
    compose = hydra.compose
    monkeypatch.setattr(hydra, "compose", lambda *a, **k: calls.append(a) or compose(*a, **k))
    monkeypatch.chdir(tmp_path)
    main(["--model", "tiny_llama", "args.device=cpu", "prompt.batch_size=1", "prompt.sp_kwargs.max_tokens=4",
          f"hydra.run.dir={tmp_path / 'run'}"])
    assert len(calls) == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["args"]["world_size"] == 1 and results["transforms"]
