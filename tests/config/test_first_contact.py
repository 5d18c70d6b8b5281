"""A new user's mistakes fail before any model work, in one line, with exit code 2 (issue 10).

In-process tests check the messages (compose_experiment + preflight, the checks a run makes before
any model work); a few `python launch.py` subprocesses check what the user sees: one line on
stderr, exit code 2, nothing built, and a traceback only when asked for.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autodeploy.cli import _exit_if_user_error, one_line
from autodeploy.config import ConfigError, UserError, compose_experiment, find_user_error, preflight, translate_argv
from autodeploy.config.completion import complete, flag_candidates

ROOT = Path(__file__).resolve().parents[2]


def cli(*argv, cwd, env=None, timeout=300):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *argv, f"hydra.run.dir={cwd / 'run'}"],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_llama_dir():
    from autodeploy.models.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny_llama")


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has (and no Triton interpreter)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ---------------------------------------------------------------- 1, 12: GPU-only choices


@pytest.mark.parametrize("argv,needle", [
    (["backend=triton"], r"backend=triton \(args.attn_backend\) needs a CUDA GPU .*use backend=torch on the CPU"),
    (["--args.attn-backend=flashinfer"], r"backend=flashinfer \(args.attn_backend\) needs a CUDA GPU( and the "
                                         r"flashinfer package \(pip install autodeploy\[gpu\]\))? and this run's "
                                         r"device is cpu: use backend=torch"),
    (["transforms/compile=torch-opt"], r"transforms/compile=torch-opt .*needs a CUDA GPU .*transforms/compile=auto"),
    (["args.compile_backend=torch-cudagraph"], r"transforms/compile=torch-cudagraph .*needs a CUDA GPU"),
    (["args.device=cuda"], r"args.device=cuda but this machine has no CUDA device: use args.device=auto or cpu"),
])
def test_gpu_only_choices_fail_at_config_time_on_cpu(no_cuda, argv, needle):
    cfg = compose_experiment(argv)  # composing (--cfg job, --dry-run) still works
    with pytest.raises(ConfigError, match=needle):
        preflight(cfg)


def test_gpu_experiments_still_compose_and_dry_run_on_cpu(no_cuda):
    cfg = compose_experiment(["experiment=llama3_8b_latency", "--dry-run"])
    assert (cfg.args.attn_backend, cfg.args.compile_backend) == ("triton", "torch-opt")


def test_the_default_fits_the_device(no_cuda):
    cfg = compose_experiment([])
    assert cfg.model == "smollm2_135m"
    assert cfg.args.compile_backend == "auto" and cfg.args.attn_backend == "torch"
    preflight(cfg)  # no error, and auto is torch-simple here (see test_auto_compile_backend_on_cpu)


def test_auto_compile_backend_on_cpu_is_torch_simple_without_warning(caplog):
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    from toy_lm import apply_compile, toy_graph

    gm = toy_graph()
    with caplog.at_level("WARNING"):
        out, info = apply_compile(gm, "cpu", backend="auto")
    assert out is gm and info.note.startswith("torch-simple: graph runs as is")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_unknown_attention_backend_fails_at_compose_time():
    with pytest.raises(ConfigError, match=r"backend=foo \(args.attn_backend\): unknown attention backend 'foo'"):
        compose_experiment(["args.attn_backend=foo"])


def test_flashinfer_not_installed_names_the_extra(monkeypatch):
    try:
        import flashinfer  # noqa: F401
        pytest.skip("flashinfer is installed here")
    except ImportError:
        pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine without the extra
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = compose_experiment(["backend=flashinfer"])
    with pytest.raises(ConfigError, match=r"backend=flashinfer .*pip install autodeploy\[gpu\]"):
        preflight(cfg)


# ---------------------------------------------------------------- 2, 3: the model and its model_kwargs


def test_misspelled_card_suggests_the_closest():
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"unknown model 'tiny-llama': did you mean tiny_llama\?"):
        compose_experiment(["--model", "tiny-llama"])  # at compose: --cfg job and --dry-run say it too
    assert time.perf_counter() - t0 < 5


def test_missing_path_and_offline_hub_id_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="does not exist"):
        preflight(compose_experiment(["--model", str(tmp_path / "nope")]))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 with no cached copy"):
        preflight(compose_experiment(["--model", "no-org/no-model"]))
    assert time.perf_counter() - t0 < 5


def test_misspelled_model_kwargs_key_fails_at_config_time():
    cfg = compose_experiment(["args.model_kwargs.num_hiden_layers=1"])
    with pytest.raises(ConfigError, match=r"args.model_kwargs.num_hiden_layers \(did you mean num_hidden_layers\?\)"):
        preflight(cfg)


def test_shape_card_without_weights_fails_at_config_time():
    with pytest.raises(ConfigError, match=r"llama3_8b is a shape card without weights: set args.skip_loading_weights=true"):
        preflight(compose_experiment(["model=llama3_8b", "args.skip_loading_weights=false"]))


# ---------------------------------------------------------------- 4: model_kwargs vs the checkpoint


def test_reshaped_model_against_checkpoint_names_the_key(tiny_llama_dir):
    from autodeploy.models.factory import ModelFactory

    factory = ModelFactory(str(tiny_llama_dir), model_kwargs={"hidden_size": 96, "num_hidden_layers": 1})
    with pytest.raises(ConfigError) as e:
        factory.check_checkpoint_fits(factory.build_model())
    msg = str(e.value)
    assert "model.embed_tokens.weight is [512, 96] here but [512, 64] in the checkpoint" in msg
    assert "changed by args.model_kwargs.hidden_size=96 (checkpoint: 64)." in msg
    assert "num_hidden_layers" not in msg  # fewer layers load fine: not a cause
    assert "args.skip_loading_weights=true" in msg
    # what fits passes: fewer layers, or random weights of the new shape
    fewer = ModelFactory(str(tiny_llama_dir), model_kwargs={"num_hidden_layers": 1})
    fewer.check_checkpoint_fits(fewer.build_model())
    random = ModelFactory(str(tiny_llama_dir), model_kwargs={"hidden_size": 96}, skip_loading_weights=True)
    random.check_checkpoint_fits(random.build_model())


def test_more_layers_than_the_checkpoint_name_the_key(tiny_llama_dir):
    from autodeploy.models.factory import ModelFactory

    factory = ModelFactory(str(tiny_llama_dir), model_kwargs={"num_hidden_layers": 3})
    with pytest.raises(ConfigError, match=r"9 parameter\(s\) are not in the checkpoint \(model.layers.2.*"
                                          r"args.model_kwargs.num_hidden_layers=3 \(checkpoint: 2\)"):
        factory.check_checkpoint_fits(factory.build_model())


def test_seed_first_example_on_a_real_checkpoint_is_one_line_before_export(tmp_path, tiny_llama_dir):
    """The seed's first command on a local checkpoint of another width: one line, exit 2, no export."""
    proc = cli("--model", str(tiny_llama_dir), "--args.model-kwargs.num-hidden-layers=10",
               "--args.model-kwargs.hidden-size=2048", "--args.tokenizer-kwargs.padding-side=left", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: checkpoint ")
    assert "args.model_kwargs.hidden_size=2048 (checkpoint: 64)" in lines[0]
    assert "args.model_kwargs.num_hidden_layers=10 (checkpoint: 2)" in lines[0]
    assert "Set args.skip_loading_weights=true for random weights of the new shape" in lines[0]
    assert "export_to_gm" not in proc.stdout  # failed in build_model, before export


# ---------------------------------------------------------------- 5: one line, exit 2, traceback on request


def test_user_error_is_one_line_exit_2_and_a_traceback_on_request(tmp_path):
    proc = cli("--model", "tiny-llama", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "Error: unknown model 'tiny-llama': did you mean tiny_llama? (cards: tiny_hybrid, tiny_llama, tiny_mixtral, "
        "smollm2_135m, llama3_70b, llama3_8b, mixtral_8x7b)"
    ]
    assert "building" not in proc.stdout  # nothing built
    full = cli("--model", "tiny-llama", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr  # caught at compose
    verbose = cli("args.world_size=0", "hydra.verbose=true", cwd=tmp_path)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "ConfigError" in verbose.stderr


def test_an_error_in_the_run_is_printed_once_and_logged(tmp_path):
    """A mistake found in the run (the model directory), not at compose: one line on the terminal,
    not a log [ERROR] line and an `Error:` line; the run's log file keeps it."""
    missing = tmp_path / "no_such_model"
    proc = cli("--model", str(missing), cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "does not exist" in line]
    assert lines == [f"Error: model directory {missing} does not exist"]
    assert f"model directory {missing} does not exist" in (tmp_path / "run" / "autodeploy.log").read_text()


def test_internal_errors_keep_their_traceback():
    _exit_if_user_error(RuntimeError("a bug"), [])  # returns: the caller re-raises with its traceback
    wrapped = RuntimeError("transform failed")
    wrapped.__cause__ = ConfigError("the user's mistake")
    assert isinstance(find_user_error(wrapped), ConfigError)
    with pytest.raises(SystemExit) as e:
        _exit_if_user_error(wrapped, [])
    assert e.value.code == 2
    noisy = ConfigError("Bad value\n    full_key: args.x\n    object_type=dict\nmore detail")
    assert one_line(noisy) == "Bad value more detail"


# ---------------------------------------------------------------- 6: flags and values


def test_flag_without_a_value():
    with pytest.raises(ConfigError, match=r"--args.world-size needs a value, e.g. --args.world-size=VALUE "
                                          r"\(args.world_size is an integer\)"):
        translate_argv(["--args.world-size", "--dry-run"])
    assert translate_argv(["--dry-run", "--benchmark.enabled"]) == ["dry_run=true", "benchmark.enabled=true"]


def test_bad_bool_of_a_transform_option_says_so():
    with pytest.raises(ConfigError) as e:
        compose_experiment(["args.transforms.detect_sharding.simple_shard_only=maybe"])
    assert "simple_shard_only='maybe' is not valid: Value 'maybe' is not a valid bool" in str(e.value)
    assert "did you mean" not in str(e.value)


# ---------------------------------------------------------------- 7: YAML files


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_repeated_yaml_extra_appends(tmp_path):
    a = _write(tmp_path / "a.yaml", "args:\n  max_batch_size: 3\n  max_seq_len: 100\n")
    b = _write(tmp_path / "b.yaml", "args:\n  max_seq_len: 300\n")
    cfg = compose_experiment(["--yaml-extra", a, "--yaml-extra", b])
    assert list(cfg.yaml_extra) == [a, b]
    assert (cfg.args.max_batch_size, cfg.args.max_seq_len) == (3, 300)  # both files, the later one wins


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "args:\n  max_batch_size: 3\n  model_kwargs: {a: 1\n")
    with pytest.raises(ConfigError, match=r"yaml_extra file .*bad.yaml, line 4, column 1: not valid YAML: expected ','"):
        compose_experiment(["--yaml-extra", bad])
    tab = _write(tmp_path / "tab.yaml", "args:\n\tmax_batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"args.yaml_extra file .*tab.yaml, line 2, column 1: not valid YAML"):
        compose_experiment(["--args.yaml-extra", tab])


def test_duplicate_yaml_key_is_an_error(tmp_path):
    dup = _write(tmp_path / "dup.yaml", "args:\n  max_batch_size: 3\n  max_batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'max_batch_size' at line 3 \(first at line 2\)"):
        compose_experiment(["--yaml-extra", dup])


# ---------------------------------------------------------------- 8, 9: dicts on the command line, cards in files


def test_whole_dict_for_a_free_form_key(tmp_path):
    cfg = compose_experiment(["args.model_kwargs={hidden_size:32,num_hidden_layers:1}"])
    assert dict(cfg.args.model_kwargs) == {"hidden_size": 32, "num_hidden_layers": 1}
    y = _write(tmp_path / "kw.yaml", "args:\n  model_kwargs:\n    vocab_size: 100\n")
    cfg = compose_experiment(["--yaml-extra", y, "--args.model-kwargs={hidden_size: 32}"])
    assert dict(cfg.args.model_kwargs) == {"vocab_size": 100, "hidden_size": 32}  # merged like any layer


def test_card_named_in_a_file_applies_its_args(tmp_path):
    card = _write(tmp_path / "card.yaml", "model: llama3_8b\n")
    by_file = compose_experiment(["--yaml-extra", card])
    by_flag = compose_experiment(["--model", "llama3_8b"])
    for cfg in (by_file, by_flag):
        assert cfg.model == "llama3_8b"
        assert (cfg.args.skip_loading_weights, cfg.args.dtype, cfg.args.max_seq_len) == (True, "bfloat16", 2048)
    # the card's args are defaults: the file and the command line still win over them
    mine = _write(tmp_path / "mine.yaml", "model: llama3_8b\nargs:\n  max_seq_len: 100\n")
    cfg = compose_experiment(["--yaml-extra", mine, "args.dtype=float32"])
    assert (cfg.args.max_seq_len, cfg.args.dtype, cfg.args.skip_loading_weights) == (100, "float32", True)
    inner = _write(tmp_path / "inner.yaml", "model: mixtral_8x7b\n")  # args-level file: args.model
    cfg = compose_experiment(["--args.yaml-extra", inner])
    assert cfg.model == "mixtral_8x7b" and cfg.args.skip_loading_weights is True


# ---------------------------------------------------------------- 11: tab completion


def test_completion_of_seed_flags():
    assert "--args.max-seq-len=" in flag_candidates("--args.")
    assert "--args.model-kwargs." in flag_candidates("--args.")
    assert "--args.transforms.detect-sharding.simple-shard-only=" not in flag_candidates("--args.")  # one level
    assert flag_candidates("--args.max") == ["--args.max-batch-size=", "--args.max-num-tokens=", "--args.max-seq-len="]
    assert "--args.transforms.compile-model." in flag_candidates("--args.transforms.comp")
    assert complete("--model tiny")[0] == ["tiny_hybrid", "tiny_llama", "tiny_mixtral"]
    # other words go to Hydra, with the seed flags before them translated
    assert complete("--args.world-size=2 transforms/compile=torch-") == (
        None, "args.world_size=2 transforms/compile=torch-")


def test_completion_after_seed_flags_prints_candidates_not_a_usage_error(tmp_path):
    for line, expected in [("python launch.py --args.", "--args.max-seq-len="),
                           ("python launch.py --model tiny_llama transforms/compile=torch-", "transforms/compile=torch-opt")]:
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "-sc", "query=bash"], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120, env={**os.environ, "COMP_LINE": line})
        assert proc.returncode == 0 and "usage:" not in proc.stderr + proc.stdout, proc.stderr
        assert expected in proc.stdout.split()


# ---------------------------------------------------------------- 12-14: the first run explains itself


def test_first_run_has_no_warning_and_explains_itself(tmp_path):
    # the default prompts on the tiny model (the default model, SmolLM2, is covered in tests/real/)
    proc = cli("model=tiny_llama", "prompt.sp_kwargs.max_tokens=3", "prompt.batch_size=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "WARNING" not in out and "WARNING" not in proc.stderr
    assert ("[note  ] tiny_llama is a built-in test model with random weights, so its text is noise: the default "
            "model (smollm2_135m) or --model DIR|FILE.gguf (a local checkpoint) gives real text") in out.splitlines()
    assert "[prompt] user: 'Name three primary colors.'" in out.splitlines()  # chat messages, readable
    assert "[prompt] 'In simple words and a single sentence, explain the concept of gravity: '" in out.splitlines()
    assert sum("tiny_llama is a built-in test model" in line for line in (out + proc.stderr).splitlines()) == 1
    run = tmp_path / "run"
    assert (run / "autodeploy.log").is_file() and not (run / "cli.log").exists()
    log_text = (run / "autodeploy.log").read_text()
    assert "compile_model] applied matches=0" in log_text  # auto -> torch-simple
    assert "tiny_llama is a built-in test model" in log_text  # the note is in the run's log too


def test_random_weights_note_names_the_fix_that_applies(tiny_llama_dir):
    from types import SimpleNamespace

    from autodeploy.run import random_weights_note

    def note(argv, kind):
        return random_weights_note(compose_experiment(argv), SimpleNamespace(source=SimpleNamespace(kind=kind)))

    # a directory was passed: its own weights are the fix, not "pass --model DIR"
    given_dir = note(["--model", str(tiny_llama_dir), "args.skip_loading_weights=true"], "dir")
    assert "pass --model" not in given_dir and "drop args.skip_loading_weights=true to load its weights" in given_dir
    assert "shape card (a config without weights)" in note(["model=llama3_8b"], "card")
    assert "the default model (smollm2_135m)" in note(["model=tiny_llama"], "tiny")
    assert note([], "gguf") is None  # the default model has real weights
