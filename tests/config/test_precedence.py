"""The seed's precedence: command line > yaml_extra > args.yaml_extra > built-in defaults.

Each layer overrides the ones below it, deep merge keeps siblings, and both command-line styles
(Hydra overrides and the seed's flags) behave the same, in-process and through the real CLI.
"""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autodeploy.config import compose_experiment

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MAX_SEQ_LEN = 512


@pytest.fixture()
def layer_files(tmp_path):
    inner = tmp_path / "inner.yaml"  # args-level (for args.yaml_extra)
    inner.write_text(yaml.safe_dump({
        "max_seq_len": 1001,
        "model_kwargs": {"a": 1, "b": 1},
        "transforms": {"insert_cached_attention": {"backend": "triton"}},
    }))
    outer = tmp_path / "outer.yaml"  # experiment-level (for yaml_extra)
    outer.write_text(yaml.safe_dump({
        "args": {
            "max_seq_len": 1002,
            "model_kwargs": {"b": 2, "c": 2},
            "transforms": {"compile_model": {"backend": "torch-compile"}},
        },
        "prompt": {"sp_kwargs": {"max_tokens": 7}},
    }))
    return inner, outer


def cli_args(style, inner=None, outer=None, cli=False):
    out = []
    if style == "hydra":
        if inner:
            out.append(f"args.yaml_extra=[{inner}]")
        if outer:
            out.append(f"yaml_extra=[{outer}]")
        if cli:
            out += ["args.max_seq_len=1003", "args.model_kwargs.c=3"]
    else:
        if inner:
            out += ["--args.yaml-extra", str(inner)]
        if outer:
            out += ["--yaml-extra", str(outer)]
        if cli:
            out += ["--args.max-seq-len=1003", "--args.model-kwargs.c", "3"]
    return out


COMBOS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("style", ["hydra", "seed"])
@pytest.mark.parametrize("use_inner,use_outer,use_cli", COMBOS)
def test_precedence_matrix(layer_files, style, use_inner, use_outer, use_cli):
    inner, outer = layer_files
    argv = cli_args(style, inner if use_inner else None, outer if use_outer else None, use_cli)
    cfg = compose_experiment(argv, check_transforms=False)

    expected_len = DEFAULT_MAX_SEQ_LEN
    expected_kwargs = {}
    if use_inner:
        expected_len = 1001
        expected_kwargs.update({"a": 1, "b": 1})
    if use_outer:
        expected_len = 1002
        expected_kwargs.update({"b": 2, "c": 2})
    if use_cli:
        expected_len = 1003
        expected_kwargs.update({"c": 3})
    assert cfg.args.max_seq_len == expected_len
    assert dict(cfg.args.model_kwargs) == expected_kwargs  # siblings from every layer kept

    # options of different transforms set in different files are all kept, with their siblings
    assert cfg.args.attn_backend == ("triton" if use_inner else "torch")
    assert cfg.args.compile_backend == ("torch-compile" if use_outer else "auto")
    assert cfg.args.transforms.compile_model.stage == "compile"
    assert cfg.prompt.sp_kwargs.max_tokens == (7 if use_outer else 100)
    assert cfg.prompt.sp_kwargs.temperature == 0.2  # untouched sibling


def test_explicit_cli_value_equal_to_default_still_wins(layer_files):
    _, outer = layer_files
    cfg = compose_experiment([f"yaml_extra=[{outer}]", f"args.max_seq_len={DEFAULT_MAX_SEQ_LEN}"], check_transforms=False)
    assert cfg.args.max_seq_len == DEFAULT_MAX_SEQ_LEN


def test_group_choice_picks_defaults_that_files_and_keys_override(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("args:\n  max_seq_len: 4096\n  compile_backend: torch-compile\n")
    # the card's own args (max_seq_len 2048, bf16, random weights) are defaults for this run
    cfg = compose_experiment(["model=llama3_8b", "transforms/compile=torch-simple"], check_transforms=False)
    assert (cfg.args.max_seq_len, cfg.args.dtype, cfg.args.compile_backend) == (2048, "bfloat16", "torch-simple")
    # ... so a file overrides them, while the chosen model itself is a command-line value
    cfg = compose_experiment([f"--yaml-extra={f}", "model=llama3_8b", "transforms/compile=torch-simple"],
                             check_transforms=False)
    assert cfg.model == "llama3_8b" and cfg.args.dtype == "bfloat16"
    assert cfg.args.max_seq_len == 4096 and cfg.args.compile_backend == "torch-compile"
    # and a key override beats the file
    cfg = compose_experiment([f"--yaml-extra={f}", "--args.compile-backend=torch-simple"], check_transforms=False)
    assert cfg.args.compile_backend == "torch-simple"


def test_shortcut_beats_transform_option_within_a_layer(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text(yaml.safe_dump({"args": {
        "compile_backend": "torch-cudagraph",
        "transforms": {"compile_model": {"backend": "torch-compile"}},
    }}))
    cfg = compose_experiment(["--yaml-extra", str(f)], check_transforms=False)
    assert cfg.args.compile_backend == cfg.args.transforms.compile_model.backend == "torch-cudagraph"


def test_shortcut_in_inner_file_loses_to_transform_option_in_outer(tmp_path):
    inner, outer = tmp_path / "i.yaml", tmp_path / "o.yaml"
    inner.write_text("attn_backend: flashinfer\n")
    outer.write_text("args:\n  transforms:\n    insert_cached_attention:\n      backend: triton\n")
    cfg = compose_experiment(["--args.yaml-extra", str(inner), "--yaml-extra", str(outer)], check_transforms=False)
    assert cfg.args.attn_backend == "triton"


def test_later_yaml_extra_file_wins(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("args:\n  max_batch_size: 3\n  world_size: 4\n")
    b.write_text("args:\n  max_batch_size: 5\n")
    cfg = compose_experiment(["--yaml-extra", str(a), str(b)], check_transforms=False)
    assert (cfg.args.max_batch_size, cfg.args.world_size) == (5, 4)


def test_args_yaml_extra_listed_in_outer_file_is_followed(tmp_path):
    inner, outer = tmp_path / "i.yaml", tmp_path / "o.yaml"
    inner.write_text("max_num_tokens: 77\nworld_size: 3\n")
    outer.write_text(f"args:\n  yaml_extra: [{inner}]\n  world_size: 2\n")
    cfg = compose_experiment(["--yaml-extra", str(outer)], check_transforms=False)
    assert cfg.args.max_num_tokens == 77 and cfg.args.world_size == 2


def test_model_alias_precedence(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("model: tiny_mixtral\n")
    assert compose_experiment(["--yaml-extra", str(f)], check_transforms=False).model == "tiny_mixtral"
    cfg = compose_experiment(["--yaml-extra", str(f), "--model", "tiny_hybrid"], check_transforms=False)
    assert cfg.model == cfg.args.model == "tiny_hybrid"
    cfg = compose_experiment(["--yaml-extra", str(f), "--model", str(tmp_path)], check_transforms=False)
    assert cfg.model == cfg.args.model == str(tmp_path)


# ---------------------------------------------------------------- through the real CLI


def run_cli(*argv):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *argv], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    return proc


@pytest.mark.parametrize("style", ["hydra", "seed"])
def test_cfg_job_prints_the_merged_config(layer_files, style):
    inner, outer = layer_files
    proc = run_cli(*cli_args(style, inner, outer, cli=True), "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["args"]["max_seq_len"] == 1003
    assert cfg["args"]["model_kwargs"] == {"a": 1, "b": 2, "c": 3}
    assert cfg["args"]["attn_backend"] == "triton" and cfg["args"]["compile_backend"] == "torch-compile"


def test_cfg_job_package_selects_a_subtree(layer_files):
    _, outer = layer_files
    proc = run_cli("--yaml-extra", str(outer), "--cfg", "job", "--package", "prompt.sp_kwargs")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "# @package prompt.sp_kwargs"
    assert yaml.safe_load("\n".join(lines[1:]))["max_tokens"] == 7
