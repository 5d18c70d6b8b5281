"""The real CLI, end to end: launch.py runs, writes results.json; the seed's commands run.

Each test is one `python launch.py ...` subprocess on the tiny models (CPU, eager graph).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "tests" / "config" / "seed_files"
FAST = ["--args.device=cpu", "transforms/compile=torch-simple"]


def launch(tmp_path, *argv, timeout=600):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *argv, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=timeout,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc, run_dir


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_default_run_writes_results(tmp_path):
    # the default run on the tiny model (the default model, SmolLM2, has tests of its own: tests/real/)
    proc, run_dir = launch(tmp_path, "model=tiny_llama", *FAST, "prompt.sp_kwargs.max_tokens=8",
                           "prompt.sp_kwargs.temperature=0")
    res = results(run_dir)
    assert res["config"]["model"] == "tiny_llama"
    assert {"config", "env", "transforms", "generations"} <= set(res)
    assert len(res["generations"]) == 2
    for gen in res["generations"]:
        assert gen["error"] is None and 1 <= len(gen["token_ids"]) <= 8
        assert gen["finish_reason"] in ("stop", "length")
    names = [t["name"] for t in res["transforms"]]
    assert names[:2] == ["build_model", "export_to_gm"] and names[-1] == "compile_model"
    attn = next(t for t in res["transforms"] if t["name"] == "match_attention_pattern")
    assert attn["num_matches"] > 0 and not attn["skipped"]
    assert "[prompt]" in proc.stdout and "[output]" in proc.stdout
    # Hydra's run folder: the composed config and the log sit beside results.json
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_seed_prompting_and_benchmarking_command(tmp_path):
    """The seed's third command (phi-4 -> tiny_llama); num/osl/warmup cut for CPU time."""
    _, run_dir = launch(
        tmp_path, "--model", "tiny_llama", "--prompt.batch-size=4", "--prompt.sp-kwargs.max-tokens=200",
        "--prompt.sp-kwargs.temperature=0.7", "--benchmark.enabled=true", "--benchmark.bs=8",
        "--benchmark.isl=1024", "--benchmark.osl=4", "--benchmark.num=1", "--benchmark.warmup=0",
        "--benchmark.allow-past-max-position=true", *FAST,  # tiny_llama has 512 positions
    )
    res = results(run_dir)
    assert len(res["generations"]) == 4
    bench = res["benchmark"]
    assert (bench["bs"], bench["isl"], bench["osl"]) == (8, 1024, 4)
    assert bench["output_tok_s"] > 0 and bench["ttft_ms"]["p50"] > 0 and bench["tpot_ms"]["p50"] > 0
    assert res["config"]["args"]["max_seq_len"] >= 1024 + 4
    assert "hf_baseline" not in bench  # compare_hf is off by default
    assert not (tmp_path / "benchmark_results.json").exists()  # store_results is off by default
    # beside results.json: one JSON-lines row (one batch size) and the plot; build time per stage
    rows = (run_dir / "benchmark.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["output_tok_s"] == bench["output_tok_s"]
    assert (run_dir / "benchmark.png").stat().st_size > 0
    assert set(res["build_stage_s"]) >= {"export", "pattern_matcher", "cache_init", "compile"}


def test_seed_model_kwargs_command(tmp_path):
    """The seed's first command: model_kwargs reshape the model (so weights are random)."""
    _, run_dir = launch(
        tmp_path, "--model", "tiny_llama", "--args.model-kwargs.num-hidden-layers=3",
        "--args.model-kwargs.hidden-size=96", "--args.tokenizer-kwargs.padding-side=left",
        "--args.skip-loading-weights=true", "--prompt.sp-kwargs.max-tokens=4", *FAST,
    )
    res = results(run_dir)
    rms = next(t for t in res["transforms"] if t["name"] == "match_rmsnorm_pattern")
    assert rms["num_matches"] == 2 * 3 + 1  # three layers really built
    assert all(g["error"] is None for g in res["generations"])


def test_seed_strict_export_command(tmp_path):
    _, run_dir = launch(tmp_path, "--model", "tiny_llama", "--args.transforms.export-to-gm.strict=true",
                        "--prompt.sp-kwargs.max-tokens=4", *FAST)
    res = results(run_dir)
    assert res["config"]["args"]["transforms"]["export_to_gm"]["strict"] is True
    assert all(g["error"] is None for g in res["generations"])


@pytest.mark.parametrize("argv", [
    ["--model", "llama3_8b", "--args.model-kwargs.num-hidden-layers=10", "--args.model-kwargs.hidden-size=2048",
     "--args.tokenizer-kwargs.padding-side=left"],
    ["--model", "tiny_llama", "--args.world-size=2", "--args.compile-backend=torch-opt", "--args.attn-backend=flashinfer"],
    ["--model", "llama3_8b", "--yaml-extra", str(SEED / "my_config.yaml"), str(SEED / "production.yaml")],
    ["--model", "llama3_8b", "--yaml-extra", str(SEED / "my_config.yaml"), "--args.yaml-extra",
     str(SEED / "autodeploy_overrides.yaml")],
    ["--model", "llama3_8b", "--yaml-extra", str(SEED / "experiment_config.yaml"), "--args.yaml-extra",
     str(SEED / "autodeploy_overrides.yaml"), "--args.world-size=8"],
], ids=["model_kwargs", "runtime_backends", "two_yaml", "nested_yaml", "nested_cli"])
def test_seed_commands_dry_run(tmp_path, argv):
    """Commands whose real run needs GPUs or several ranks: --dry-run resolves and plans them."""
    proc, _ = launch(tmp_path, *argv, "--dry-run")
    text = proc.stdout
    cfg = yaml.safe_load(text.split("# pipeline")[0])
    assert cfg["dry_run"] is True and cfg["args"]["model"] == cfg["model"]
    assert "# pipeline" in text and "export_to_gm" in text and "insert_cached_attention" in text


def test_multirun_sweeps_compile_backends(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "-m", "transforms/compile=torch-simple,torch-compile",
         "--dry-run", f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    backends = [yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text())[0] for p in jobs]
    assert backends == ["transforms/compile=torch-simple", "transforms/compile=torch-compile"]
    assert "compile_backend: torch-compile" in proc.stdout and "compile_backend: torch-simple" in proc.stdout
    assert not (sweep_dir / "summary.csv").exists()  # a dry run runs nothing to summarize
