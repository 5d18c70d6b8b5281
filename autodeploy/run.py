"""One experiment: build the engine, run the prompt queries, benchmark, write ``results.json``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from .config.schema import ExperimentConfig, PromptConfig
from .units import human_bytes

log = logging.getLogger("autodeploy")


def to_log_file(level: int, message: str) -> None:
    """Into the run's log file only: what the terminal already shows as one plain line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord("autodeploy", level, __file__, 0, message, None, None))


def expand_queries(prompt: PromptConfig) -> list[Any]:
    """``prompt.queries`` repeated or cut to ``prompt.batch_size``."""
    queries = list(prompt.queries)
    if not queries:
        return []
    n = prompt.batch_size
    return [queries[i % len(queries)] for i in range(n)]


def show_prompt(prompt: Any) -> str:
    """A prompt as a reader wants it: text quoted, chat messages as ``role: content`` turns."""
    if isinstance(prompt, dict) and len(prompt) == 1 and next(iter(prompt)) in ("prompt", "messages"):
        prompt = next(iter(prompt.values()))
    if isinstance(prompt, str):
        return repr(prompt)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        return " | ".join(f"{m['role']}: {m.get('content', '')!r}" for m in prompt)
    return json.dumps(prompt)


def random_weights_note(cfg: ExperimentConfig, factory: Any) -> str | None:
    """One line when the weights are random, so nobody reads meaning into the text."""
    from .models.cards import is_tiny

    kind = getattr(getattr(factory, "source", None), "kind", None)
    real_text = "the default model (smollm2_135m) or --model DIR|FILE.gguf (a local checkpoint) gives real text"
    if is_tiny(cfg.model):
        why = f"{cfg.model} is a built-in test model with random weights"
    elif kind == "card":
        why = f"{cfg.model} is a shape card (a config without weights), so it runs with random weights"
    elif cfg.args.skip_loading_weights:  # a checkpoint was given: its own weights are the fix
        why, real_text = (f"{cfg.model} runs with random weights (args.skip_loading_weights=true)",
                          "drop args.skip_loading_weights=true to load its weights")
    else:
        return None
    return f"[note  ] {why}, so its text is noise: {real_text}"


def environment(cfg: ExperimentConfig) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
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


def run(cfg: ExperimentConfig, output_dir: str | os.PathLike = ".") -> dict[str, Any]:
    from .bench.report import build_stage_times
    from .llm import LLM
    from .runtime.sampling_params import SamplingParams

    from .distributed.env import serve_if_worker

    world_size = cfg.args.world_size  # the run's one read; handed to every mode below
    if cfg.dry_run:
        _dry_run(cfg, world_size)
        return {}
    if not cfg.plan_only and serve_if_worker(world_size):  # SLURM ran this job in every task
        return {}  # ranks > 0 serve rank 0 and write nothing
    out_dir = Path(output_dir)
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "env": environment(cfg)}
    if cfg.plan_only:
        return _plan_only(cfg, world_size, out_dir, results)
    serving = cfg.server.name != "none" or (cfg.benchmark.enabled and cfg.benchmark.kind == "serve")
    if serving:
        _check_serving(cfg)
        if cfg.benchmark.enabled and cfg.benchmark.url:  # a running server: no engine here
            from .bench.serve import run_serve_benchmark

            results["benchmark"] = run_serve_benchmark(cfg)
            return _finish(cfg, results, out_dir)
    t0 = time.perf_counter()
    llm = LLM.from_config(cfg, world_size)
    results["build_s"] = time.perf_counter() - t0
    results["transforms"] = llm.build_report
    if llm.sharding_plan is not None:
        results.update(_sharding_results(llm.sharding_plan))
    results["build_stage_s"] = build_stage_times(llm.build_report)

    note = random_weights_note(cfg, llm.factory)
    if note:
        print(note, flush=True)
        to_log_file(logging.INFO, note)
    if serving:  # the server (or the serving benchmark) instead of the prompts and the offline benchmark
        try:
            if cfg.benchmark.enabled:
                from .bench.serve import run_serve_benchmark

                results["benchmark"] = run_serve_benchmark(cfg, llm)
            else:
                from .serve import serve

                serve(llm, cfg)
            return _finish(cfg, results, out_dir)
        finally:
            llm.shutdown()
    queries = expand_queries(cfg.prompt)
    if llm.tokenizer is None:
        log.warning("model %s has no tokenizer: the prompt queries are skipped", cfg.model)
        queries = []
    params = SamplingParams(**dataclasses.asdict(cfg.prompt.sp_kwargs))
    outputs = llm.generate(queries, params) if queries else []
    results["generations"] = []
    for out in outputs:
        shown = show_prompt(out.prompt)
        if out.error:
            print(f"[prompt] {shown}\n[error ] {out.error}", flush=True)
        else:
            print(f"[prompt] {shown}\n[output] {out.text!r} ({out.finish_reason})", flush=True)
        results["generations"].append({
            "prompt": out.prompt, "text": out.text, "token_ids": list(out.token_ids),
            "finish_reason": out.finish_reason, "error": out.error,
        })

    if cfg.benchmark.enabled:
        from .bench.benchmark import run_benchmark

        results["benchmark"] = run_benchmark(llm.engine, cfg.benchmark, factory=llm.factory)

    _finish(cfg, results, out_dir)
    llm.shutdown()
    return results


def _check_serving(cfg: ExperimentConfig) -> None:
    """Serving's checks, before any model work."""
    from .config.errors import ConfigError
    from .serve import check_installed

    check_installed()
    if cfg.benchmark.enabled and cfg.benchmark.kind != "serve":
        raise ConfigError(f"server={cfg.server.name} serves until it is stopped, so the offline benchmark "
                          "(benchmark.enabled) would never run: use benchmark=serve to benchmark the server")


def _finish(cfg: ExperimentConfig, results: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """results.json, the benchmark's JSON-lines row(s) and PNG, W&B."""
    from .bench import report, serve as serve_bench

    if cfg.benchmark.enabled and cfg.benchmark.store_results:
        _write_json(Path(cfg.benchmark.results_path), {"config": results["config"], "env": results["env"],
                                                       "benchmark": results["benchmark"]})
    path = out_dir / "results.json"
    _write_json(path, results)
    log.info("results: %s", path)
    if cfg.benchmark.enabled:
        write_artifacts = serve_bench.write_artifacts if cfg.benchmark.kind == "serve" else report.write_artifacts
        for kind, written in write_artifacts(results, out_dir, cfg.benchmark).items():
            log.info("benchmark %s: %s", kind, written)
    _track(cfg, results, out_dir)
    return results


def _dry_run(cfg: ExperimentConfig, world_size: int) -> None:
    """The final config (an ``ExperimentConfig``) and the pipeline that would run, without touching a model."""
    from omegaconf import OmegaConf

    from .transforms.optimizer import plan_pipeline

    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    print("# pipeline (stage order; disabled transforms are listed but skipped)")
    pipeline = plan_pipeline(cfg.args.transforms)
    for name, tcfg in pipeline:
        state = "" if tcfg.enabled else "  [disabled]"
        print(f"#   {tcfg.stage:<16} {name}{state}")
    sharding = dict(pipeline).get("detect_sharding")
    if world_size > 1 and sharding is not None and sharding.enabled:
        _print_sharding_options(sharding, world_size)


def _print_sharding_options(opts, world: int) -> None:
    """What the options alone say about the plan; its layers need the model's shapes (plan_only)."""
    from .sharding.detect import describe_grid

    print(f"# sharding (world_size {world})")
    if opts.simple_shard_only:
        print("#   simple_shard_only: every linear column-split + all-gather where its output divides")
    else:
        print(f"#   sources {' > '.join(opts.sharding_source)}; heuristic dims {', '.join(opts.sharding_dims) or 'none'}")
        print(f"#   {describe_grid(opts.process_grid, world, opts.sharding_dims)}")
    print("#   the per-layer plan needs the model's shapes: plan_only=true prints it (on meta, one CPU process); "
          "a plan that splits nothing is refused unless asked for (sharding=replicate)")


def _sharding_results(plan) -> dict[str, Any]:
    return {"sharding_plan": [row.to_dict() for row in plan.rows()], "sharding_summary": plan.summary()}


def _plan_only(cfg: ExperimentConfig, world_size: int, out_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """``plan_only=true``: the sharding plan of ``world_size`` ranks, computed on meta here (no ranks start)."""
    from .build import plan_sharding

    built = plan_sharding(cfg.args, world_size)
    results["build_s"] = built.build_s
    results["transforms"] = built.report
    if built.sharding is None:
        print(f"plan_only: nothing to shard at args.world_size={world_size}", flush=True)
    else:
        results.update(_sharding_results(built.sharding))
        summary = results["sharding_summary"]
        print(f"world_size {summary['world_size']}: {human_bytes(summary['bytes_total'])} of weights in all, at most "
              f"{human_bytes(summary['bytes_per_rank_max'])} per rank, {summary['collectives_per_forward']} "
              f"collectives per forward\n{built.sharding.summary_line()}", flush=True)
    path = out_dir / "results.json"
    _write_json(path, results)
    log.info("results: %s", path)
    return results


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


def _track(cfg: ExperimentConfig, results: dict[str, Any], out_dir: Path) -> None:
    if cfg.logger.name != "wandb":
        return
    from .tracking import log_to_wandb

    log_to_wandb(cfg.logger, results, out_dir)
