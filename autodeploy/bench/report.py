"""What a benchmark run leaves next to ``results.json``: a JSON-lines row per batch size and a PNG.

- ``benchmark.jsonl`` (``benchmark.jsonl_path``; relative to the run folder, or one file that all
  runs of a sweep append to): one flat row per batch size with the run's identity (model, backends,
  disabled transforms, commit, device) and its headline figures, for sweeps and plots;
- ``benchmark.png`` (``benchmark.plot``; needs matplotlib): ITL over the last timed round of each
  batch size, and output / decode tok/s against batch size when several sizes ran.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


def build_stage_times(transforms: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per pipeline stage (export, pattern_matcher, ..., compile), in pipeline order."""
    stages: dict[str, float] = {}
    for row in transforms:
        stages[row["stage"]] = stages.get(row["stage"], 0.0) + float(row.get("time_s") or 0.0)
    return stages


def _p(d: Optional[dict], key: str = "p50") -> Optional[float]:
    return d.get(key) if isinstance(d, dict) else None


def identity(results: dict[str, Any]) -> dict[str, Any]:
    """A JSON-lines row's first columns: which run (model, backends, commit, device, build)."""
    cfg, env, bench = results["config"], results["env"], results["benchmark"]
    transforms = cfg["args"]["transforms"]
    return {
        "time": env.get("time"), "git_rev": env.get("git_rev"), "device": env.get("device"),
        "torch": env.get("torch"), "model": cfg.get("model"), "world_size": cfg["args"].get("world_size"),
        "compile_backend": transforms.get("compile_model", {}).get("backend"),
        "attn_backend": transforms.get("insert_cached_attention", {}).get("backend"),
        "disabled_transforms": sorted(k for k, v in transforms.items() if not v.get("enabled", True)),
        "build_s": results.get("build_s"),
        **{f"build_{stage}_s": s for stage, s in (results.get("build_stage_s") or {}).items()},
        "peak_gpu_mem_gib": bench.get("peak_gpu_mem_gib"),
    }


def jsonl_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    bench, ident = results["benchmark"], identity(results)
    rows = []
    for r in bench["by_batch_size"].values():
        roof = r.get("roofline") or {}
        rows.append({
            **ident, "bs": r["bs"], "isl": r["isl"], "osl": r["osl"],
            "ttft_ms_p50": _p(r["ttft_ms"]), "tpot_ms_p50": _p(r["tpot_ms"]), "itl_ms_p50": _p(r["itl_ms"]),
            "itl_ms_p99": _p(r["itl_ms"], "p99"), "e2e_ms_p50": _p(r["e2e_ms"]),
            "output_tok_s": r["output_tok_s"], "total_tok_s": r["total_tok_s"],
            "decode_tok_s": r["decode_tok_s"], "tpot_tok_s": r["tpot_tok_s"],
            "host_ms_per_step_p50": _p(r["host_ms_per_step"]),
            "decode_host_ms_per_step_p50": _p(r["decode_host_ms_per_step"]),
            "decode_host_ms_per_step_by_rank": r.get("decode_host_ms_per_step_by_rank"),
            "copy_bw_tb_s": roof.get("copy_bw_tb_s"), "decode_floor_tok_s": roof.get("decode_floor_tok_s"),
            "decode_fraction": roof.get("decode_fraction"), "prefill_fraction": roof.get("prefill_fraction"),
        })
    if "hf_baseline" in bench:  # HF ran at bench.bs: on that size's row
        row = next(r for r in rows if r["bs"] == bench["bs"])
        row["hf_eager_output_tok_s"] = bench["hf_baseline"]["output_tok_s"]
        row["hf_eager_ttft_ms_p50"] = _p(bench["hf_baseline"]["ttft_ms"])
        row["hf_static_compile_decode_tok_s"] = bench["hf_static_compile"]["decode_tok_s"]
        row["hf_static_compile_ttft_ms_p50"] = _p(bench["hf_static_compile"]["ttft_ms"])
    return rows


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write per row: concurrent runs of a sweep append whole lines
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def plot(bench: dict[str, Any], path: Path, title: str = "") -> Optional[Path]:
    """The PNG, or None (with a log line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("benchmark.plot: matplotlib is not installed, no %s", path.name)
        return None
    runs = [bench["by_batch_size"][k] for k in bench["by_batch_size"]]
    sweep = len(runs) > 1
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(12 if sweep else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for r in runs:
        tr = r.get("itl_trace") or {}
        ax.scatter(tr.get("t_s", []), tr.get("itl_ms", []), s=4, label=f"bs {r['bs']} (ITL p50 {_p(r['itl_ms']) or 0:.2f} ms)")
    ax.set_xlabel("time in the last timed round (s)")
    ax.set_ylabel("inter-token latency (ms)")
    ax.set_yscale("log")
    ax.set_title("ITL over the run")
    ax.legend(fontsize=8)
    if sweep:
        ax = axes[0][1]
        sizes = [r["bs"] for r in runs]
        order = sorted(range(len(sizes)), key=sizes.__getitem__)
        xs = [sizes[i] for i in order]
        ax.plot(xs, [runs[i]["output_tok_s"] for i in order], "o-", label="output tok/s (prefill included)")
        ax.plot(xs, [runs[i]["decode_tok_s"] or 0 for i in order], "s-", label="decode tok/s (bs / ITL p50)")
        floors = [(runs[i].get("roofline") or {}).get("decode_floor_tok_s") for i in order]
        if all(f is not None for f in floors):
            ax.plot(xs, floors, "k--", label="decode floor (measured copy bandwidth)")
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens / s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_title("throughput vs batch size")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_artifacts(results: dict[str, Any], out_dir: Path, bench_cfg: Any) -> dict[str, str]:
    """Append the JSON-lines rows and draw the PNG; returns the paths written."""
    return save_artifacts(results, out_dir, bench_cfg, jsonl_rows(results), plot, "on")


def save_artifacts(results: dict[str, Any], out_dir: Path, bench_cfg: Any, rows: list[dict],
                   draw: Callable[[dict, Path, str], Optional[Path]], verb: str) -> dict[str, str]:
    """``rows`` appended to ``bench_cfg.jsonl_path`` (relative: in ``out_dir``) and ``draw``'s PNG
    of ``results["benchmark"]``, titled "<model> <verb> <device> at <commit>, <time>"."""
    written = {}
    jsonl = getattr(bench_cfg, "jsonl_path", None)
    if jsonl:
        path = Path(jsonl) if Path(jsonl).is_absolute() else out_dir / jsonl
        append_jsonl(path, rows)
        written["jsonl"] = str(path)
    if getattr(bench_cfg, "plot", True):
        env, cfg = results["env"], results["config"]
        title = f"{cfg.get('model')} {verb} {env.get('device')} at {env.get('git_rev')}, {env.get('time')}"
        png = draw(results["benchmark"], out_dir / "benchmark.png", title)
        if png is not None:
            written["png"] = str(png)
    return written
