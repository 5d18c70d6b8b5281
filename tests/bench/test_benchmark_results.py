"""Benchmark metrics and what a benchmark run leaves behind: percentiles(), benchmark.compare_hf,
benchmark.store_results / results_path, and args.skip_tokenizer_init, run as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autodeploy.bench.benchmark import percentiles
from autodeploy.bench.hf_baselines import hf_baselines

ROOT = Path(__file__).resolve().parents[2]


def test_percentiles_nearest_rank():
    xs = [float(x) for x in range(1, 102)]  # 1..101: the median is 51
    shuffled = xs[::2] + xs[1::2]
    assert percentiles(shuffled) == {"mean": 51.0, "p50": 51.0, "p90": 91.0, "p99": 100.0, "max": 101.0}
    assert percentiles([7.5]) == {"mean": 7.5, "p50": 7.5, "p90": 7.5, "p99": 7.5, "max": 7.5}
    assert percentiles([]) == {}
    assert percentiles([1.0, 100.0]) == {"mean": 50.5, "p50": 1.0, "p90": 100.0, "p99": 100.0, "max": 100.0}


def test_hf_baseline_needs_the_factory():
    with pytest.raises(ValueError, match="compare_hf needs the model factory"):
        hf_baselines(None, "cpu", [[1, 2]], 2, 1)


def test_benchmark_run_compares_hf_and_stores_results_without_a_tokenizer(tmp_path):
    stored = tmp_path / "nested" / "bench.json"
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--benchmark.enabled=true", "--benchmark.compare-hf=true",
         "--benchmark.store-results=true", f"--benchmark.results-path={stored}", "--benchmark.bs=2",
         "--benchmark.isl=8", "--benchmark.osl=3", "--benchmark.num=1", "--benchmark.warmup=0",
         "--args.skip-tokenizer-init=true", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    bench = results["benchmark"]
    assert (bench["bs"], bench["isl"], bench["osl"]) == (2, 8, 3)
    hf = bench["hf_baseline"]  # compare_hf: HF eager generate on the same prompts, same process
    assert hf["output_tok_s"] > 0 and hf["wall_s"] > 0 and set(hf["ttft_ms"]) == {"mean", "p50", "p90", "p99", "max"}
    # store_results writes the benchmark to results_path (its folder created), not to the default path
    saved = json.loads(stored.read_text())
    assert set(saved) == {"config", "env", "benchmark"} and saved["benchmark"]["hf_baseline"] == hf
    assert saved["config"]["benchmark"]["results_path"] == str(stored)
    assert not (tmp_path / "benchmark_results.json").exists()
    # skip_tokenizer_init: no tokenizer, so the text prompts are skipped (said so) and token ids still run
    assert results["generations"] == []
    assert "has no tokenizer: the prompt queries are skipped" in proc.stdout
