"""``summary.png``: the chosen metric per job, bars grouped by the swept keys; below it, when jobs
ran a benchmark, throughput against latency across the grid."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .summary import JobRow, Summary

log = logging.getLogger("autodeploy")

LATENCY, THROUGHPUTS = "tpot_p50_ms", ("decode_tok_s", "output_tok_s")


def _short(key: str) -> str:
    return key.split(".")[-1].split("/")[-1]


def _label(row: JobRow, keys: list[str], with_keys: bool = True) -> str:
    values = row.values()
    if with_keys:
        return ", ".join(f"{_short(k)}={values.get(k, '-')}" for k in keys) or f"job {row.job}"
    return ", ".join(values.get(k, "-") for k in keys) or f"job {row.job}"


def write_png(summary: Summary, path: Path) -> Path | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("summary.png skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    tradeoff = _tradeoff(summary.rows)
    fig = Figure(figsize=(max(6.0, 1.0 * len(summary.rows) + 3), 9.0 if tradeoff else 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if tradeoff else 1, 1, squeeze=False)[:, 0]
    _bars(axes[0], summary)
    if tradeoff:
        _scatter(axes[1], summary, *tradeoff)
    fig.savefig(path, dpi=100)
    return path


def _bars(ax, summary: Summary) -> None:
    """One bar per job; the first swept key picks the colour when two or more keys are swept."""
    keys, metric = summary.swept_keys, summary.metric
    hue_key = keys[0] if len(keys) >= 2 else None
    x_keys = keys[1:] if hue_key else keys
    groups = list(dict.fromkeys(_label(r, x_keys, with_keys=False) for r in summary.rows))
    hues = list(dict.fromkeys(r.values().get(hue_key, "-") for r in summary.rows)) if hue_key else [None]
    width = 0.8 / len(hues)
    unit = 2**30 if metric and metric.startswith("bytes") else 1  # bytes are shown in GiB
    top = max([r.metrics[metric] / unit for r in summary.rows if metric in r.metrics] or [1.0])
    for h, hue in enumerate(hues):
        color = f"C{h}"
        labelled = False
        for row in summary.rows:
            if hue_key and row.values().get(hue_key, "-") != hue:
                continue
            x = groups.index(_label(row, x_keys, with_keys=False)) + (h - (len(hues) - 1) / 2) * width
            value = row.metrics[metric] / unit if metric in row.metrics else None
            if value is None:  # a failed job (or one without this metric) is marked, not dropped
                ax.text(x, top * 0.02, row.status if row.status != "ok" else "n/a", rotation=90, ha="center",
                        va="bottom", color="red" if row.status != "ok" else "gray", fontsize=9)
                continue
            label = f"{_short(hue_key)}={hue}" if hue_key and not labelled else None
            ax.bar(x, value, width * 0.9, color=color, label=label)
            ax.text(x, value, f"{value:.4g}", ha="center", va="bottom", fontsize=8)
            labelled = True
    crowded = sum(len(g) for g in groups) > 60
    ax.set_xticks(range(len(groups)), groups, rotation=25 if crowded else 0, ha="right" if crowded else "center")
    ax.set_xlabel(", ".join(_short(k) for k in x_keys) or "job")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel(f"{metric} (GiB)" if unit > 1 else metric or "no job reported a metric")
    ax.set_title(f"{metric or 'status'} per job ({summary.counts()})")
    if hue_key:
        ax.legend(fontsize=8)


def _tradeoff(rows: list[JobRow]) -> tuple[str, str] | None:
    for throughput in THROUGHPUTS:
        if sum(LATENCY in r.metrics and throughput in r.metrics for r in rows) >= 2:
            return LATENCY, throughput
    return None


def _scatter(ax, summary: Summary, latency: str, throughput: str) -> None:
    for row in summary.rows:
        if latency in row.metrics and throughput in row.metrics:
            x, y = row.metrics[latency], row.metrics[throughput]
            ax.scatter([x], [y], color="C0")
            ax.annotate(_label(row, summary.swept_keys), (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{latency} (lower is better)")
    ax.set_ylabel(f"{throughput} (higher is better)")
    ax.set_title("throughput vs latency")
    ax.grid(True, alpha=0.3)
