"""One table of the performance run: our benchmark runs, the hand-written anchor, HF, the floors.

    python scripts/perf_summary.py DIR [DIR ...]

Reads from each DIR: ``perf_<name>.json`` (results.json of ``launch.py ... benchmark.enabled``, one
row per batch size), ``anchor.txt`` (the ``RESULT {...}`` line of hand_decode.py) and
``hf_baselines.json`` (``python -m autodeploy.bench.hf_baselines``). Missing files are skipped, so it
also summarizes a run that was cut short. Imports nothing but the standard library.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _p(d, key="p50"):
    return d.get(key) if isinstance(d, dict) else None


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def ours(path: Path) -> list[dict]:
    r = json.loads(path.read_text())
    b = r.get("benchmark") or {}
    stages = r.get("build_stage_s") or {}
    rows = []
    for key, x in (b.get("by_batch_size") or {}).items():
        roof = x.get("roofline") or {}
        rows.append({
            "what": f"{path.stem.removeprefix('perf_')} bs{x['bs']}", "bs": x["bs"],
            "decode_tok_s": x.get("decode_tok_s"), "itl_p50": _p(x.get("itl_ms")), "itl_p99": _p(x.get("itl_ms"), "p99"),
            "tpot_p50": _p(x.get("tpot_ms")), "ttft_p50": _p(x.get("ttft_ms")), "output_tok_s": x.get("output_tok_s"),
            "host_ms": _p(x.get("decode_host_ms_per_step")), "decode_frac": roof.get("decode_fraction"),
            "floor_tok_s": roof.get("decode_floor_tok_s"), "prefill_frac": roof.get("prefill_fraction"),
            "prefill_held": roof.get("prefill_fraction_sustained"),
            "build": r.get("build_s"), "compile_s": stages.get("compile"), "export_s": stages.get("export"),
            "mem": b.get("peak_gpu_mem_gib"), "copy_bw": roof.get("copy_bw_tb_s"), "rev": r["env"].get("git_rev"),
        })
    return rows


def anchor(path: Path) -> list[dict]:
    line = next((ln for ln in path.read_text().splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return []
    res = json.loads(line[len("RESULT "):])
    return [{"what": f"anchor hand_decode bs{k[2:]}", "bs": int(k[2:]), "decode_tok_s": v["tok_s"],
             "itl_p50": v["ms_per_step"], "build": v.get("warm_s")} for k, v in res.items() if k.startswith("bs")]


def hf(path: Path) -> list[dict]:
    res = json.loads(path.read_text().strip().splitlines()[-1])
    return [{"what": f"HF {kind} bs{res['bs']}", "bs": res["bs"], "decode_tok_s": x.get("decode_tok_s"),
             "tpot_p50": x.get("tpot_ms"), "ttft_p50": _p(x.get("ttft_ms")), "output_tok_s": x.get("output_tok_s")}
            for kind, x in res.items() if kind in ("eager", "static_compile")]


COLUMNS = [  # header, key, format
    ("what", "what", "{}"), ("decode tok/s", "decode_tok_s", "{:.0f}"), ("ITL p50 ms", "itl_p50", "{:.2f}"),
    ("ITL p99", "itl_p99", "{:.1f}"), ("TPOT p50", "tpot_p50", "{:.2f}"), ("TTFT p50", "ttft_p50", "{:.1f}"),
    ("out tok/s", "output_tok_s", "{:.0f}"), ("host ms/step", "host_ms", "{:.2f}"), ("vs floor", "decode_frac", "{:.0%}"),
    ("floor tok/s", "floor_tok_s", "{:.0f}"), ("prefill vs floor", "prefill_frac", "{:.0%}"),
    ("vs held rate", "prefill_held", "{:.0%}"), ("build s", "build", "{:.0f}"),
    ("compile s", "compile_s", "{:.0f}"), ("peak GiB", "mem", "{:.1f}"),
]


def table(rows: list[dict]) -> str:
    cells = [[h for h, _, _ in COLUMNS]] + [[_f(r.get(k), fmt) if k != "what" else r["what"] for _, k, fmt in COLUMNS]
                                            for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def main(dirs: list[str]) -> None:
    rows = []
    for d in map(Path, dirs):
        for p in sorted(d.glob("perf_*.json")):
            rows += ours(p)
        if (d / "anchor.txt").is_file():
            rows += anchor(d / "anchor.txt")
        if (d / "hf_baselines.json").is_file():
            rows += hf(d / "hf_baselines.json")
    rows.sort(key=lambda r: (r["bs"], r["what"]))
    print(table(rows))
    anchors = {r["bs"]: r["decode_tok_s"] for r in rows if r["what"].startswith("anchor")}
    for r in rows:
        if r["what"].startswith(("anchor", "HF")) or not r.get("decode_tok_s") or r["bs"] not in anchors:
            continue
        print(f"{r['what']}: {r['decode_tok_s'] / anchors[r['bs']]:.2f}x the anchor's decode tok/s "
              f"(target >= 1.05x)")
    revs = {r.get("rev") for r in rows if r.get("rev")}
    copy_bw = {round(r["copy_bw"], 2) for r in rows if r.get("copy_bw")}
    print(f"commit {', '.join(sorted(revs)) or '?'}; copy bandwidth measured {copy_bw or '-'} TB/s")


if __name__ == "__main__":
    main(sys.argv[1:] or ["."])
