"""A sweep folder -> one table: ``summary.csv``, ``summary.md`` and ``summary.png``.

Built from the job folders alone (``.hydra/overrides.yaml``, ``results.json``, ``failure.json``),
so it works for every launcher and for a folder copied from a cluster.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..units import human_bytes
from .jobs import FAILURE_FILE, RESULTS_FILE

log = logging.getLogger("autodeploy")

# Metric columns: (column, dotted path in results.json). Add a row here to add a column; a key a
# job's results lack leaves its cell empty.
METRICS: tuple[tuple[str, str], ...] = (
    ("build_s", "build_s"),
    ("ttft_p50_ms", "benchmark.ttft_ms.p50"),
    ("tpot_p50_ms", "benchmark.tpot_ms.p50"),
    ("decode_tok_s", "benchmark.decode_tok_s"),
    ("output_tok_s", "benchmark.output_tok_s"),
    ("bytes_per_rank", "sharding_summary.bytes_per_rank_max"),
    # the serving benchmark (benchmark=serve): load, what got through, and the latencies' tails
    ("request_rate", "benchmark.request_rate"),
    ("max_concurrency", "benchmark.max_concurrency"),
    ("request_throughput", "benchmark.request_throughput"),
    ("failed", "benchmark.failed"),
    ("ttft_p99_ms", "benchmark.ttft_ms.p99"),
    ("itl_p99_ms", "benchmark.itl_ms.p99"),
    ("e2e_p50_ms", "benchmark.e2e_ms.p50"),
    # what tells sharding plans apart beyond their bytes (e.g. process grids): collectives and the bytes each
    # rank sends per token of a forward, and the experts each rank holds (MoE models only)
    ("collectives", "sharding_summary.collectives_per_forward"),
    ("comm_bytes_per_token", "sharding_summary.comm_bytes_per_token"),
    ("experts_per_rank", "sharding_summary.experts_per_rank_max"),
)
# The picture's metric when none is chosen: the first one any job has.
PREFERRED_METRICS = ("decode_tok_s", "output_tok_s", "tpot_p50_ms", "ttft_p50_ms", "experts_per_rank", "bytes_per_rank",
                     "build_s")
SKIP_DIRS = {".submitit", "wandb"}


@dataclass
class JobRow:
    job: int | None
    dir: Path
    overrides: list[str]
    status: str  # ok | failed | incomplete (no results and no failure record: running, or died unrecorded)
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def values(self) -> dict[str, str]:
        """Override key -> value (``+``/``++`` dropped)."""
        out = {}
        for ov in self.overrides:
            key, _, value = ov.partition("=")
            out[key.lstrip("+~")] = value
        return out


@dataclass
class Summary:
    sweep_dir: Path
    rows: list[JobRow]
    swept_keys: list[str]
    metric: str | None
    files: list[Path]

    @property
    def failed(self) -> list[JobRow]:
        return [r for r in self.rows if r.status != "ok"]

    def counts(self) -> str:
        ok = sum(r.status == "ok" for r in self.rows)
        failed = sum(r.status == "failed" for r in self.rows)
        incomplete = len(self.rows) - ok - failed
        text = f"{len(self.rows)} jobs: {ok} ok, {failed} failed"
        return text + (f", {incomplete} incomplete" if incomplete else "")


def _select(data: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Folders under the sweep that belong to a job (Hydra's record, results or a failure)."""
    found = set()
    for path in sweep_dir.rglob("*"):
        rel = path.relative_to(sweep_dir).parts
        if any(p in SKIP_DIRS for p in rel):
            continue
        if path.name == "overrides.yaml" and path.parent.name == ".hydra":
            found.add(path.parent.parent)
        elif path.name in (RESULTS_FILE, FAILURE_FILE):
            found.add(path.parent)
    return sorted(found)


def read_job(job_dir: Path) -> JobRow:
    failure = _read_json(job_dir / FAILURE_FILE)
    results = _read_json(job_dir / RESULTS_FILE)
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        overrides = yaml.safe_load(overrides_file.read_text()) or []
    else:
        overrides = (failure or {}).get("overrides", [])
    job = (failure or {}).get("job_num")
    hydra_file = job_dir / ".hydra" / "hydra.yaml"
    if job is None and hydra_file.is_file():
        job = _select(yaml.safe_load(hydra_file.read_text()), "hydra.job.num")
    if job is None and job_dir.name.isdigit():
        job = int(job_dir.name)
    metrics = {}
    for column, path in METRICS:
        value = _select(results, path)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[column] = float(value)
    if failure is not None:
        status, error = "failed", failure.get("error", "")
    elif results is not None:
        status, error = "ok", ""
    else:
        status, error = "incomplete", "no results.json and no failure.json: still running, or the process died"
    return JobRow(job=job, dir=job_dir, overrides=[str(o) for o in overrides], status=status,
                  error=error.splitlines()[0] if error else "", metrics=metrics)


def swept_keys(rows: list[JobRow]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they first appear."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.values() if k not in keys)
    return [k for k in keys if len({row.values().get(k) for row in rows}) > 1]


def choose_metric(rows: list[JobRow], metric: str | None) -> str | None:
    columns = [c for c, _ in METRICS]
    if metric is not None:
        if metric not in columns:
            raise ValueError(f"unknown summary metric {metric!r}; choose one of: {', '.join(columns)}")
        return metric
    return next((m for m in PREFERRED_METRICS if any(m in r.metrics for r in rows)), None)


def collect(sweep_dir: str | Path, metric: str | None = None) -> Summary:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {sweep_dir}")
    rows = [read_job(d) for d in job_dirs(sweep_dir)]
    rows.sort(key=lambda r: (r.job is None, r.job if r.job is not None else 0, str(r.dir)))
    return Summary(sweep_dir, rows, swept_keys(rows), choose_metric(rows, metric), [])


def write_summary(sweep_dir: str | Path, metric: str | None = None) -> Summary:
    """Write summary.csv, summary.md and summary.png into the sweep folder."""
    return write(collect(sweep_dir, metric))


def write(summary: Summary) -> Summary:
    out = summary.sweep_dir
    summary.files.append(_write_csv(summary, out / "summary.csv"))
    from .plot import write_png

    png = write_png(summary, out / "summary.png")
    summary.files.append(_write_md(summary, out / "summary.md", png))
    if png is not None:
        summary.files.append(png)
    return summary


def _fmt(value: float | None, column: str = "") -> str:
    if value is None:
        return ""
    return human_bytes(value) if column.startswith("bytes") else f"{value:.4g}"


def _write_csv(summary: Summary, path: Path) -> Path:
    metric_cols = [c for c, _ in METRICS]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", *summary.swept_keys, "status", *metric_cols, "error", "overrides", "dir"])
        for r in summary.rows:
            values = r.values()
            writer.writerow([
                "" if r.job is None else r.job, *(values.get(k, "") for k in summary.swept_keys), r.status,
                *(r.metrics.get(c, "") for c in metric_cols), r.error, " ".join(r.overrides),
                str(r.dir.relative_to(summary.sweep_dir)),
            ])
    return path


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _write_md(summary: Summary, path: Path, png: Path | None) -> Path:
    # metric columns no job has are left out of the Markdown table (the CSV keeps them all)
    metric_cols = [c for c, _ in METRICS if any(c in r.metrics for r in summary.rows)]
    keys = summary.swept_keys or ["overrides"]
    header = ["job", *keys, "status", *metric_cols, "error"]
    lines = [f"# Sweep summary: {summary.sweep_dir}", "", summary.counts(), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary.rows:
        values = r.values() if summary.swept_keys else {"overrides": " ".join(r.overrides)}
        cells = ["" if r.job is None else r.job, *(values.get(k, "") for k in keys), r.status,
                 *(_fmt(r.metrics.get(c), c) for c in metric_cols), r.error]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if png is not None:
        lines += ["", f"![{summary.metric or 'status'} per job]({png.name})"]
    path.write_text("\n".join(lines) + "\n")
    return path


def markdown_table(summary: Summary) -> str:
    md = summary.sweep_dir / "summary.md"
    return md.read_text() if md.is_file() else summary.counts()
