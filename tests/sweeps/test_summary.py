"""The sweep summary from job folders alone, `python -m autodeploy.report`, and failure records."""

import json
import subprocess
import sys

import pytest
import yaml

from autodeploy.distributed.env import launcher_env
from autodeploy.sweep.jobs import describe, run_isolated
from autodeploy.sweep.summary import collect, write_summary
from sweep_helpers import assert_png, summary_rows


def _job(root, num, overrides, results=None, failure=None):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if results is not None:
        (d / "results.json").write_text(json.dumps(results))
    if failure is not None:
        (d / "failure.json").write_text(json.dumps({"status": "failed", "error": failure, "job_num": num}))
    return d


def _bench(ttft, tpot, out_tok_s, decode=None):
    b = {"ttft_ms": {"mean": ttft, "p50": ttft}, "tpot_ms": {"p50": tpot}, "output_tok_s": out_tok_s, "bs": 1}
    if decode is not None:
        b["decode_tok_s"] = decode
    return b


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    fixed = "args.device=cpu"
    _job(root, 0, ["backend=torch", "benchmark.bs=1", fixed],
         {"build_s": 3.5, "benchmark": _bench(10.0, 2.0, 400.0, decode=480.0),
          "sharding_summary": {"world_size": 2, "bytes_per_rank_max": 1000}})
    _job(root, 1, ["backend=triton", "benchmark.bs=1", fixed], failure="ValueError: boom\nsecond line")
    _job(root, 2, ["backend=torch", "benchmark.bs=8", fixed], {"build_s": 3.0, "benchmark": _bench(30.0, 4.0, 1600.0)})
    _job(root, 3, ["backend=triton", "benchmark.bs=8", fixed])  # no results, no failure record
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_rows_statuses_swept_keys_and_metrics(sweep):
    summary = collect(sweep)
    assert [r.job for r in summary.rows] == [0, 1, 2, 3]
    assert [r.status for r in summary.rows] == ["ok", "failed", "ok", "incomplete"]
    assert summary.swept_keys == ["backend", "benchmark.bs"]  # args.device is the same everywhere
    assert summary.rows[0].metrics == {"build_s": 3.5, "ttft_p50_ms": 10.0, "tpot_p50_ms": 2.0, "decode_tok_s": 480.0,
                                       "output_tok_s": 400.0, "bytes_per_rank": 1000.0}
    assert summary.rows[1].error == "ValueError: boom"  # first line only
    assert summary.metric == "decode_tok_s"  # the first preferred metric any job has
    assert len(summary.failed) == 2 and summary.counts() == "4 jobs: 2 ok, 1 failed, 1 incomplete"


def test_files_written(sweep):
    summary = write_summary(sweep, metric="ttft_p50_ms")
    assert {p.name for p in summary.files} == {"summary.csv", "summary.md", "summary.png"}
    rows = summary_rows(sweep)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "incomplete"]
    assert rows[0]["backend"] == "torch" and rows[2]["benchmark.bs"] == "8"
    assert float(rows[2]["output_tok_s"]) == 1600.0 and rows[1]["output_tok_s"] == ""
    assert rows[1]["error"] == "ValueError: boom" and rows[1]["dir"] == "1"
    md = (sweep / "summary.md").read_text()
    assert "| 1 | triton | 1 | failed |" in md and "ValueError: boom" in md
    assert "4 jobs: 2 ok, 1 failed, 1 incomplete" in md and "![ttft_p50_ms per job](summary.png)" in md
    assert_png(sweep / "summary.png")


def test_markdown_leaves_out_metrics_no_job_has(tmp_path):
    _job(tmp_path, 0, ["a=1"], {"build_s": 1.0})
    _job(tmp_path, 1, ["a=2"], {"build_s": 2.0})
    write_summary(tmp_path)
    header = (tmp_path / "summary.md").read_text().splitlines()[4]
    assert header == "| job | a | status | build_s | error |"
    assert "decode_tok_s" in (tmp_path / "summary.csv").read_text().splitlines()[0]  # the CSV keeps every column


def test_plan_only_grids_are_told_apart_by_their_experts_per_rank(tmp_path):
    """Plan-only jobs of MoE grids hold the same bytes per rank; the picture shows the experts each rank holds."""
    for num, (grid, experts) in enumerate([("{ep:4}", 1), ("{ep:2,tp:2}", 2), ("{ep:1,tp:4}", 4)]):
        _job(tmp_path, num, [f"args.transforms.detect_sharding.process_grid={grid}"], {"build_s": 1.0, "sharding_summary": {
            "bytes_per_rank_max": 1000, "collectives_per_forward": 5, "comm_bytes_per_token": 3072,
            "experts_per_rank_max": experts}})
    _job(tmp_path, 3, ["args.transforms.detect_sharding.process_grid=null"], {"build_s": 1.0, "sharding_summary": {
        "bytes_per_rank_max": 1000, "collectives_per_forward": 5, "comm_bytes_per_token": 3072,
        "experts_per_rank_max": None}})  # a plan without MoE layers has no expert count
    summary = write_summary(tmp_path)
    assert summary.metric == "experts_per_rank"
    rows = summary_rows(tmp_path)
    assert [r["experts_per_rank"] for r in rows] == ["1.0", "2.0", "4.0", ""]
    assert {(r["collectives"], r["comm_bytes_per_token"]) for r in rows} == {("5.0", "3072.0")}


def test_unknown_metric_is_named(sweep):
    with pytest.raises(ValueError, match="unknown summary metric 'tok_s'.*output_tok_s"):
        collect(sweep, metric="tok_s")


def _report(*argv):
    return subprocess.run([sys.executable, "-m", "autodeploy.report", *map(str, argv)], capture_output=True, text=True,
                          timeout=120)


def test_report_cli_for_a_copied_folder(sweep, tmp_path):
    proc = _report(sweep, "--metric", "output_tok_s")
    assert proc.returncode == 1, proc.stderr  # a job failed
    assert "4 jobs: 2 ok, 1 failed, 1 incomplete" in proc.stdout
    assert_png(sweep / "summary.png")
    ok = tmp_path / "ok"
    _job(ok, 0, ["a=1"], {"build_s": 1.0})
    assert _report(ok).returncode == 0
    missing = _report(tmp_path / "nowhere")
    assert missing.returncode == 2 and "sweep folder not found" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = _report(tmp_path / "empty")
    assert empty.returncode == 2 and "no job folders" in empty.stderr
    bad = _report(sweep, "--metric", "speed")
    assert bad.returncode == 2 and "invalid choice: 'speed'" in bad.stderr


def test_describe_keeps_the_cause_of_a_submitit_error():
    from submitit.core.utils import FailedJobError

    error = FailedJobError(
        "Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call last):\n"
        "  File \"x.py\", line 1\nRuntimeError: CUDA out of memory\n\n----------------------\n"
        "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /a.err\n  - /a.out\n")
    assert describe(error) == ("FailedJobError: Job (task=0) failed during processing with trace: | "
                               "RuntimeError: CUDA out of memory")
    assert describe(KeyError("k")) == "KeyError: 'k'"


def test_run_isolated_records_on_rank0_and_reraises_on_workers(tmp_path, monkeypatch):
    def boom():
        raise RuntimeError("rank died\ndetails")

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    record = run_isolated(boom, str(tmp_path / "r0"), ["a=1"], 3)
    saved = json.loads((tmp_path / "r0" / "failure.json").read_text())
    assert record["error"] == saved["error"] == "RuntimeError: rank died | details"
    assert saved["job_num"] == 3 and saved["overrides"] == ["a=1"] and "Traceback" in saved["traceback"]
    monkeypatch.setenv("SLURM_PROCID", "1")  # task 1 of 2: a worker rank
    monkeypatch.setenv("SLURM_NTASKS", "2")
    launcher_env.cache_clear()  # a process reads its launcher's variables once; this test changes them
    with pytest.raises(RuntimeError, match="rank died"):
        run_isolated(boom, str(tmp_path / "r1"), ["a=1"], 3)
    assert not (tmp_path / "r1").exists()  # a worker rank writes nothing
    assert run_isolated(lambda: {"ok": 1}, str(tmp_path / "r2"), [], 0) == {"ok": 1}


def test_callback_checks_its_metric_before_any_job():
    from autodeploy.sweep.callback import SweepSummary

    with pytest.raises(ValueError, match="sweep_summary.metric='speed' is not a summary column.*ttft_p50_ms"):
        SweepSummary(metric="speed")
    assert SweepSummary(metric="ttft_p50_ms").metric == "ttft_p50_ms"


def test_long_swept_values_keep_the_png_readable(tmp_path):
    """Tick labels of long swept values (YAML paths, process grids) are wrapped: none overlaps another
    or leaves the picture, and bytes are shown in a unit that fits them (KiB, not 0.0003 GiB)."""
    from autodeploy.sweep.plot import TICK_CHARS, figure

    long = ["yaml_extra=[experiments/sharding/manual_tp_plan_for_the_hybrid_model_v{}.yaml]",
            "args.transforms.detect_sharding.process_grid={{ep:{},tp:2}}"]
    for num in range(4):
        _job(tmp_path, num, [long[0].format(num), long[1].format(num + 1)],
             {"build_s": 1.0, "sharding_summary": {"world_size": 2, "bytes_per_rank_max": 331_000 + num}})
    summary = collect(tmp_path)
    summary.metric = "bytes_per_rank"
    fig = figure(summary)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
    assert len(boxes) == 4
    assert all(max(len(line) for line in t.get_text().splitlines()) <= TICK_CHARS for t in ax.get_xticklabels())
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    width, _ = fig.canvas.get_width_height()
    assert all(b.x0 >= 0 and b.x1 <= width for b in boxes)
    assert ax.get_ylabel() == "bytes_per_rank (KiB)"
    write_summary(tmp_path, metric="bytes_per_rank")
    assert "323.2 KiB" in (tmp_path / "summary.md").read_text()


def test_human_bytes():
    from autodeploy.units import human_bytes

    assert [human_bytes(n) for n in (0, 1023, 331_000, 5 * 2**20, 3 * 2**30, 2**42)] == [
        "0 B", "1023 B", "323.2 KiB", "5.0 MiB", "3.0 GiB", "4.0 TiB"]
