"""Build-time benchmark of the front of the pipeline: export + post_export + pattern_matcher.

    python -m autodeploy.bench.build_time [--models tiny_llama,tiny_mixtral,llama3_8b,mixtral_8x7b]

Tiny models are built on CPU with random weights (no tokenizer); shape cards (``models/cards``)
are built on ``meta`` in bf16, so the 8B shape costs no weight memory. The transforms and their
options come from ``conf/transforms/default.yaml``. Prints one row per model: export time, time of
each stage, total, and the canonical ops in the final graph.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODELS = ("tiny_llama", "tiny_mixtral", "llama3_8b", "mixtral_8x7b")
STAGES = ("post_export", "pattern_matcher")


def pattern_pipeline() -> dict[str, dict[str, Any]]:
    """The default pipeline's post_export and pattern_matcher transforms, in YAML order."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "conf" / "transforms" / "default.yaml"
    transforms = yaml.safe_load(path.read_text())
    return {name: opts for name, opts in transforms.items() if opts.get("stage") in STAGES}


def build_hf_model(name: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from autodeploy.models.cards import shape_card_path
    from autodeploy.models.tiny import TINY_SPECS

    if name in TINY_SPECS:
        spec = TINY_SPECS[name]
        config = AutoConfig.for_model(spec["model_type"], vocab_size=spec["vocab_size"], **spec["config"])
        torch.manual_seed(spec.get("seed", 0))
        return AutoModelForCausalLM.from_config(config).eval()
    path = shape_card_path(name)
    if path is None:
        raise SystemExit(f"unknown model {name!r}: neither a tiny model nor a shape card")
    config = AutoConfig.for_model(**json.loads(path.read_text()))
    config.use_cache = False
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def time_build(name: str, max_batch_size: int = 8, max_seq_len: int = 2048) -> dict[str, Any]:
    from autodeploy.export.export import export_to_gm
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    model = build_hf_model(name)
    t0 = time.perf_counter()
    gm = export_to_gm(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    export_s = time.perf_counter() - t0

    class _Factory:
        config = model.config

    optimizer = InferenceOptimizer(pattern_pipeline())
    t1 = time.perf_counter()
    gm = optimizer(BuildContext(factory=_Factory()), gm)
    transforms_s = time.perf_counter() - t1
    per_stage = Counter()
    for record in optimizer.report:
        per_stage[record.stage] += record.time_s
    ops = Counter(str(n.target).split(".")[1] for n in gm.graph.nodes if str(n.target).startswith("autodeploy."))
    return {
        "model": name,
        "export_s": export_s,
        **{f"{stage}_s": per_stage[stage] for stage in STAGES},
        "total_s": export_s + transforms_s,
        "ops": dict(sorted(ops.items())),
        "transforms": [(r.name, r.num_matches, r.time_s) for r in optimizer.report],
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'model':<14} {'export s':>9} {'post_export s':>14} {'pattern s':>10} {'total s':>8}  canonical ops"
    print(header)
    print("-" * len(header))
    for r in rows:
        ops = ", ".join(f"{k}={v}" for k, v in r["ops"].items())
        print(f"{r['model']:<14} {r['export_s']:>9.2f} {r['post_export_s']:>14.2f} {r['pattern_matcher_s']:>10.2f} "
              f"{r['total_s']:>8.2f}  {ops}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated tiny models / shape cards")
    parser.add_argument("--per-transform", action="store_true", help="also print each transform's matches and time")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    rows = []
    for name in args.models.split(","):
        rows.append(time_build(name.strip()))
        if args.per_transform:
            for t_name, matches, secs in rows[-1]["transforms"]:
                print(f"  {name}: {t_name:<32} matches={matches:<5} {secs:.2f}s")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
