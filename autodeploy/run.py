"""One experiment: build the engine, run the prompt queries, benchmark, write ``results.json``."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("autodeploy")


def expand_queries(prompt: DictConfig) -> list[Any]:
    """``prompt.queries`` repeated or cut to ``prompt.batch_size`` (plain Python objects)."""
    queries = OmegaConf.to_container(prompt.queries, resolve=True) or []
    if not queries:
        return []
    n = prompt.batch_size
    return [queries[i % len(queries)] for i in range(n)]


def environment(cfg: DictConfig) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "world_size": cfg.args.world_size,
        "git_rev": _git_rev(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return env


def _git_rev() -> str | None:
    if os.environ.get("AUTODEPLOY_GIT_REV"):  # set where the tree travels without .git (GPU machine)
        return os.environ["AUTODEPLOY_GIT_REV"]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(cfg: DictConfig, output_dir: str | os.PathLike = ".") -> dict[str, Any]:
    from .bench.report import build_stage_times, write_artifacts
    from .llm import LLM
    from .runtime.sampling_params import SamplingParams

    out_dir = Path(output_dir)
    results: dict[str, Any] = {"config": OmegaConf.to_container(cfg, resolve=True), "env": environment(cfg)}
    t0 = time.perf_counter()
    llm = LLM.from_config(cfg)
    results["build_s"] = time.perf_counter() - t0
    results["transforms"] = llm.build_report
    results["build_stage_s"] = build_stage_times(llm.build_report)

    queries = expand_queries(cfg.prompt)
    if llm.tokenizer is None:
        log.warning("model %s has no tokenizer: the prompt queries are skipped", cfg.model)
        queries = []
    params = SamplingParams(**OmegaConf.to_container(cfg.prompt.sp_kwargs, resolve=True))
    outputs = llm.generate(queries, params) if queries else []
    results["generations"] = []
    for out in outputs:
        shown = out.prompt if isinstance(out.prompt, str) else json.dumps(out.prompt)
        if out.error:
            print(f"[prompt] {shown!r}\n[error ] {out.error}", flush=True)
        else:
            print(f"[prompt] {shown!r}\n[output] {out.text!r} ({out.finish_reason})", flush=True)
        results["generations"].append({
            "prompt": out.prompt, "text": out.text, "token_ids": list(out.token_ids),
            "finish_reason": out.finish_reason, "error": out.error,
        })

    if cfg.benchmark.enabled:
        from .bench.benchmark import run_benchmark

        results["benchmark"] = run_benchmark(llm.engine, cfg.benchmark, factory=llm.factory)
        if cfg.benchmark.store_results:
            _write_json(Path(cfg.benchmark.results_path), {"config": results["config"], "env": results["env"],
                                                           "benchmark": results["benchmark"]})

    path = out_dir / "results.json"
    _write_json(path, results)
    log.info("results: %s", path)
    if cfg.benchmark.enabled:
        for kind, written in write_artifacts(results, out_dir, cfg.benchmark).items():
            log.info("benchmark %s: %s", kind, written)
    _track(cfg, results, out_dir)
    llm.shutdown()
    return results


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


def _track(cfg: DictConfig, results: dict[str, Any], out_dir: Path) -> None:
    if cfg.logger.name != "wandb":
        return
    from .tracking import log_to_wandb

    log_to_wandb(cfg.logger, results, out_dir)
