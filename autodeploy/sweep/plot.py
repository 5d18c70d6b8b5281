"""``summary.png``: the chosen metric per job, bars grouped by the swept keys; below it, when jobs
ran a benchmark, throughput against latency across the grid."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from ..units import byte_unit

if TYPE_CHECKING:
    from .summary import JobRow, Summary

log = logging.getLogger("autodeploy")

LATENCY, THROUGHPUTS = "tpot_p50_ms", ("decode_tok_s", "output_tok_s")
TICK_CHARS = 18  # a tick label's line: more is wrapped (a swept YAML path or grid stays readable)


def _short(key: str) -> str:
    return key.split(".")[-1].split("/")[-1]


def _label(row: JobRow, keys: list[str], with_keys: bool = True) -> str:
    values = row.values()
    if with_keys:
        return ", ".join(f"{_short(k)}={values.get(k, '-')}" for k in keys) or f"job {row.job}"
    return ", ".join(values.get(k, "-") for k in keys) or f"job {row.job}"


def _wrap(text: str, width: int = TICK_CHARS, lines: int = 3) -> str:
    """A long swept value (a YAML path, a process grid) on a few short lines; the rest as '...'."""
    parts = textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [text]
    return "\n".join(parts[:lines - 1] + [textwrap.shorten(" ".join(parts[lines - 1:]), width, placeholder="...")]
                     if len(parts) > lines else parts)


def figure(summary: Summary):
    """The summary's matplotlib Figure (None without matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("summary.png skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    tradeoff = _tradeoff(summary.rows)
    # each group of bars gets room for its wrapped label (TICK_CHARS characters at 8 pt: about 1.2 inches)
    groups = len({_label(r, summary.swept_keys) for r in summary.rows})
    fig = Figure(figsize=(max(6.0, 1.3 * groups + 2), 9.0 if tradeoff else 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if tradeoff else 1, 1, squeeze=False)[:, 0]
    _bars(axes[0], summary)
    if tradeoff:
        _scatter(axes[1], summary, *tradeoff)
    return fig


def write_png(summary: Summary, path: Path) -> Path | None:
    fig = figure(summary)
    if fig is None:
        return None
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
    top = max([r.metrics[metric] for r in summary.rows if metric in r.metrics] or [1.0])
    unit, unit_name = byte_unit(top) if metric and metric.startswith("bytes") else (1, "")
    top /= unit
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
            label = _wrap(f"{_short(hue_key)}={hue}", 40) if hue_key and not labelled else None
            ax.bar(x, value, width * 0.9, color=color, label=label)
            ax.text(x, value, f"{value:.4g}", ha="center", va="bottom", fontsize=8)
            labelled = True
    ax.set_xticks(range(len(groups)), [_wrap(g) for g in groups], fontsize=8)
    ax.set_xlabel(", ".join(_short(k) for k in x_keys) or "job")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel(f"{metric} ({unit_name})" if unit_name else metric or "no job reported a metric")
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
            ax.annotate(_wrap(_label(row, summary.swept_keys), 30, 2), (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{latency} (lower is better)")
    ax.set_ylabel(f"{throughput} (higher is better)")
    ax.set_title("throughput vs latency")
    ax.grid(True, alpha=0.3)
