"""A cold and a warm build of one model, each in a fresh process, per phase (issue 26: rebuilds).

    python scripts/rebuild_check.py [--model tiny_llama] [--out DIR] [--runs 2] [--detail] [--mega-cache] [--keep-cache] [key=value ...]
    # the 8B shape as scripts/fp8_gpu_check.py builds it, on one GPU:
    python scripts/rebuild_check.py --model llama3_8b --detail dtype=bfloat16 max_seq_len=2048 max_batch_size=32 \
        attn_backend=triton compile_backend=torch-opt "cuda_graph_batch_sizes=[1,32]" free_mem_ratio=0.3

The first build starts with an empty build cache (``AUTODEPLOY_BUILD_CACHE``, inductor's and
Triton's caches inside ``DIR/cache``); every later one finds it filled. Each child builds with
``LLM(model, **args)`` (``key=value``: fields of ``args``, YAML values; ``transforms.X.Y=...``
nests), then generates 8 greedy tokens of one fixed prompt (the first of them is the "first
token"). Prints, per run: process start to first token, imports, the LLM phases (config,
preflight, setup, pipeline, engine), the pipeline's stages and the build cache's note; warm
tokens must equal the cold ones. ``DIR/<run>.json`` keeps each child's record.
``--detail`` also times the host steps inside the phases (``DETAIL``: Hydra's compose, the transform
checks, the device checks, ``create_factory``, the cache key, the tokenizer), each with the seconds
its imports took; it imports their modules first, so their own import time moves to "imports".
``--mega-cache``: the cold run saves torch's mega-cache (``torch.compiler.save_cache_artifacts``) and
each warm run starts with empty inductor and Triton folders and loads it before the build: torch's
portable caches against the build cache's own inductor folder (a plain warm run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = [[1, 17, 42, 99, 7, 3, 250, 11, 64, 5] * 4]


def _nest(pairs: list[str]) -> dict:
    import yaml

    args: dict = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        *path, leaf = key.removeprefix("args.").split(".")
        node = args
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return args


# --detail: the host steps inside the phases, each with the seconds its first imports took
DETAIL = {"config": [("hydra", "compose"), ("autodeploy.config", "validate_transforms")],
          "preflight": [("autodeploy.config.preflight", "check_device_choices"),
                        ("autodeploy.models.factory", "create_factory")],
          "build": [("autodeploy.build_cache", "BuildCache.for_build"),
                    ("autodeploy.models.factory", "ModelFactory.init_tokenizer")]}


def _instrument(detail: dict) -> None:
    """Wrap DETAIL's functions: seconds, seconds in imports, modules imported (first call's imports
    land in whichever step runs them first)."""
    import builtins
    import importlib

    in_import = {"s": 0.0, "depth": 0}

    def timing(fn):
        def timed(*args, **kwargs):
            if in_import["depth"]:
                return fn(*args, **kwargs)
            in_import["depth"] += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                in_import["s"] += time.perf_counter() - t
                in_import["depth"] -= 1
        return timed

    builtins.__import__ = timing(builtins.__import__)
    importlib.import_module = timing(importlib.import_module)
    for phase, targets in DETAIL.items():
        for module_name, qualname in targets:
            owner = importlib.import_module(module_name)
            *path, attr = qualname.split(".")
            for part in path:
                owner = getattr(owner, part)
            raw = owner.__dict__[attr]
            is_classmethod = isinstance(raw, classmethod)
            fn = raw.__func__ if is_classmethod else raw
            key = f"{phase}: {qualname}"

            def wrapped(*args, _fn=fn, _key=key, **kwargs):
                t, imp, mods = time.perf_counter(), in_import["s"], len(sys.modules)
                try:
                    return _fn(*args, **kwargs)
                finally:
                    row = detail.setdefault(_key, {"s": 0.0, "import_s": 0.0, "modules": 0, "calls": 0})
                    row["s"] += time.perf_counter() - t
                    row["import_s"] += in_import["s"] - imp
                    row["modules"] += len(sys.modules) - mods
                    row["calls"] += 1

            setattr(owner, attr, classmethod(wrapped) if is_classmethod else wrapped)


def child(model: str, pairs: list[str], out: Path, detail: bool, mega: Path | None) -> None:
    import torch  # (the imports a user's process pays, timed apart from the build)

    steps: dict = {}
    if detail:
        _instrument(steps)
    from autodeploy import LLM, SamplingParams
    from autodeploy.bench.report import build_stage_times

    mega_load_s = None
    if mega is not None and mega.exists():  # a warm run of --mega-cache: its compile caches start empty
        t = time.perf_counter()
        torch.compiler.load_cache_artifacts(mega.read_bytes())
        mega_load_s = time.perf_counter() - t
    imported = time.perf_counter() - START
    t0 = time.perf_counter()
    llm = LLM(model, **_nest(pairs))
    build_s = time.perf_counter() - t0
    stages = build_stage_times(llm.build_report)
    notes = {r["name"]: r["note"] for r in llm.build_report if r["name"] in ("build_cache", "compile_model")}
    t1 = time.perf_counter()
    out_tokens = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    record = {"import_s": imported, "build_s": build_s, "phases_s": llm.build_phases, "stage_s": stages,
              "notes": notes, "generate_s": time.perf_counter() - t1,
              "process_to_first_token_s": time.perf_counter() - START, "tokens": out_tokens[0].token_ids,
              "detail": steps, "modules": len(sys.modules), "mega_load_s": mega_load_s}
    if mega is not None and not mega.exists():  # the cold run of --mega-cache: what it compiled
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            mega.write_bytes(artifacts[0])
    out.write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny_llama")
    parser.add_argument("--out", default="/tmp/rebuild_check")
    parser.add_argument("--runs", type=int, default=2, help="the first cold, the others warm")
    parser.add_argument("--keep-cache", action="store_true", help="do not empty the cache first (all warm)")
    parser.add_argument("--detail", action="store_true", help="time the host steps inside config and preflight")
    parser.add_argument("--mega-cache", action="store_true",
                        help="the warm runs start with empty inductor/Triton folders and load torch's mega-cache "
                             "(torch.compiler.save_cache_artifacts of the cold run) instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts, pairs = parser.parse_known_args()
    out = Path(opts.out)
    if opts.child:
        return child(opts.model, pairs, Path(opts.child), opts.detail,
                     Path(opts.child).parent / "mega.bin" if opts.mega_cache else None)
    out.mkdir(parents=True, exist_ok=True)
    caches = out / "cache"
    if not opts.keep_cache:
        shutil.rmtree(caches, ignore_errors=True)
        (out / "mega.bin").unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", AUTODEPLOY_BUILD_CACHE=str(caches / "build"),
               TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), TRITON_CACHE_DIR=str(caches / "triton"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    records = []
    for i in range(opts.runs):
        name = "cold" if i == 0 and not opts.keep_cache else f"warm{i}"
        path = out / f"{name}.json"
        path.unlink(missing_ok=True)
        if opts.mega_cache and i > 0:
            for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
                env[var] = str(caches / f"{var.lower()}-run{i}")
                shutil.rmtree(env[var], ignore_errors=True)
        subprocess.run([sys.executable, __file__, "--model", opts.model, "--child", str(path), *pairs]
                       + (["--detail"] if opts.detail else []) + (["--mega-cache"] if opts.mega_cache else []),
                       env=env, check=True)
        records.append((name, json.loads(path.read_text())))
    print(f"\n{opts.model} {' '.join(pairs)}: seconds")
    for name, r in records:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stage_s"].items())
        print(f"{name:6s} to first token {r['process_to_first_token_s']:.2f} (imports {r['import_s']:.2f}, "
              f"LLM() {r['build_s']:.2f}, generate 8 {r['generate_s']:.2f})\n"
              f"       phases: {phases}\n       stages: {stages}\n       cache: {r['notes'].get('build_cache', '-')}")
        if r.get("mega_load_s") is not None:
            print(f"       mega-cache loaded in {r['mega_load_s']:.2f} (before the build), into empty compile caches")
        for key, row in r["detail"].items():
            print(f"       {key}: {row['s']:.2f} ({row['import_s']:.2f} importing {row['modules']} modules; "
                  f"{row['calls']} call(s))")
    same = all(r["tokens"] == records[0][1]["tokens"] for _, r in records)
    print(f"tokens {'identical' if same else 'DIFFER'} across runs: {records[0][1]['tokens']}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
