"""``benchmark=serve``: the OpenAI-compatible server under load, reported as ``vllm bench serve`` does.

    python launch.py benchmark=serve [benchmark.request_rate=4] [benchmark.max_concurrency=32] ...
    python -m autodeploy.bench.serve [the same arguments]            # the same run
    python -m autodeploy.bench.serve --model M benchmark.url=http://host:8000   # a running server

The run builds its engine, starts the server on it (the ``server`` group's host and port with
``server=openai``; otherwise a free loopback port) and sends ``num_prompts`` streamed completions:
``isl`` random prompt token ids each (or the prompts of ``benchmark.dataset``), greedy, exactly
``osl`` tokens (``ignore_eos``), at Poisson arrivals of ``request_rate`` per second (inf: all at
once) and at most ``max_concurrency`` in flight; ``warmup`` untimed requests go first, one by one.
The client runs in a process of its own (``serve_client.py``). With ``benchmark.url`` no engine is
built: the client targets that server (random prompts need the model's vocabulary: ``--model``).

Reported (definitions as vLLM's): completed and failed requests, request throughput, output and
total tok/s over the benchmark's duration; TTFT (first streamed chunk), TPOT ((latency - TTFT) /
(output tokens - 1)), ITL (gaps between streamed chunks) and E2E latency as mean, median (p50) and
p99. Written: ``results.json`` (``benchmark``), a JSON-lines row and ``benchmark.png``.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..config.errors import ConfigError
from .stats import percentiles

log = logging.getLogger("autodeploy")


def random_requests(num: int, isl: int, osl: int, vocab_size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(vocab_size) for _ in range(isl)], "max_tokens": osl} for _ in range(num)]


def dataset_requests(path: str, num: int, osl: int) -> list[dict]:
    """Prompts from a JSON-lines file (or a JSON list): each a string, a token-id list, or
    ``{"prompt": ..., "max_tokens": n}`` (``output_len`` is read as ``max_tokens`` too). Repeated
    or cut to ``num``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"benchmark.dataset file not found: {path}")
    text = p.read_text()
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    except ValueError as e:
        raise ConfigError(f"benchmark.dataset {path}: not JSON lines (or a JSON list): {e}") from None
    requests = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            prompt = item.get("prompt")
            max_tokens = item.get("max_tokens", item.get("output_len", osl))
        else:
            prompt, max_tokens = item, osl
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            raise ConfigError(f"benchmark.dataset {path}: entry {i + 1} has no prompt (a string or token ids)")
        requests.append({"prompt": prompt, "max_tokens": int(max_tokens)})
    if not requests:
        raise ConfigError(f"benchmark.dataset {path} holds no prompts")
    return [requests[i % len(requests)] for i in range(num)]


def make_requests(bench: Any, vocab_size: Optional[int]) -> list[dict]:
    if bench.dataset:
        return dataset_requests(bench.dataset, int(bench.num_prompts), int(bench.osl))
    if not vocab_size:
        raise ConfigError("random prompts need the model's vocabulary size; pass --model, or benchmark.dataset")
    return random_requests(int(bench.num_prompts), int(bench.isl), int(bench.osl), int(vocab_size), int(bench.seed))


def run_client(url: str, bench: Any, requests: list[dict], model: Optional[str] = None) -> dict:
    """The client in a process of its own; its raw records."""
    with tempfile.TemporaryDirectory(prefix="autodeploy-serve-bench-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({
            "url": url, "model": model, "requests": requests, "request_rate": float(bench.request_rate),
            "max_concurrency": bench.max_concurrency, "warmup": int(bench.warmup), "seed": int(bench.seed),
        }))
        proc = subprocess.run([sys.executable, "-m", "autodeploy.bench.serve_client", str(spec), str(out)])
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the serving benchmark's client failed (exit code {proc.returncode}; see above)")
        return json.loads(out.read_text())


def summarize(raw: dict, bench: Any, url: Optional[str] = None) -> dict[str, Any]:
    records = raw["records"]
    ok = [r for r in records if r["ok"]]
    duration = raw["duration_s"]
    inputs, outputs = sum(r["prompt_tokens"] for r in ok), sum(r["output_tokens"] for r in ok)
    tpot = [(r["latency_s"] - r["ttft_s"]) * 1e3 / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    itl_t, itl_ms = [], []  # every chunk gap, at its time in the run (the plot)
    for r in ok:
        t = r["start_s"] + r["ttft_s"]
        for gap in r["itl_s"]:
            t += gap
            itl_t.append(round(t, 5))
            itl_ms.append(round(gap * 1e3, 4))
    errors = list(dict.fromkeys(r["error"] for r in records if not r["ok"]))
    return {
        "kind": "serve", "url": url, "model": raw.get("model"), "isl": int(bench.isl), "osl": int(bench.osl),
        "dataset": bench.dataset, "num_prompts": len(records), "request_rate": float(bench.request_rate),
        "max_concurrency": bench.max_concurrency, "warmup": int(bench.warmup),
        "completed": len(ok), "failed": len(records) - len(ok), "errors": errors[:5], "duration_s": duration,
        "total_input_tokens": inputs, "total_output_tokens": outputs,
        "request_throughput": len(ok) / duration, "output_tok_s": outputs / duration,
        "total_tok_s": (inputs + outputs) / duration, "peak_concurrency": raw.get("peak_concurrency"),
        "ttft_ms": percentiles([r["ttft_s"] * 1e3 for r in ok]), "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles(itl_ms), "e2e_ms": percentiles([r["latency_s"] * 1e3 for r in ok]),
        "itl_trace": {"t_s": itl_t, "itl_ms": itl_ms},
        "requests_trace": {"start_s": [round(r["start_s"], 5) for r in ok],
                           "ttft_ms": [round(r["ttft_s"] * 1e3, 4) for r in ok],
                           "e2e_ms": [round(r["latency_s"] * 1e3, 4) for r in ok]},
    }


def table(result: dict[str, Any]) -> str:
    """The result as ``vllm bench serve`` prints it."""
    def row(name: str, value: Any) -> str:
        value = f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{name:<40}{value:<10}"

    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
             row("Successful requests:", result["completed"]), row("Failed requests:", result["failed"]),
             row("Maximum request concurrency:", result["max_concurrency"]),
             row("Request rate configured (RPS):", result["request_rate"]),
             row("Benchmark duration (s):", result["duration_s"]),
             row("Total input tokens:", result["total_input_tokens"]),
             row("Total generated tokens:", result["total_output_tokens"]),
             row("Request throughput (req/s):", result["request_throughput"]),
             row("Output token throughput (tok/s):", result["output_tok_s"]),
             row("Peak concurrent requests:", result["peak_concurrency"]),
             row("Total token throughput (tok/s):", result["total_tok_s"])]
    for key, title, short in (("ttft_ms", "Time to First Token", "TTFT"),
                              ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl_ms", "Inter-token Latency", "ITL"), ("e2e_ms", "End-to-end Latency", "E2EL")):
        stats = result[key]
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        for label, p in (("Mean", "mean"), ("Median", "p50"), ("P99", "p99")):
            lines.append(row(f"{label} {short} (ms):", float(stats.get(p, float("nan")))))
    if result["errors"]:
        lines.append("{s:{c}^50}".format(s="Errors (first ones)", c="-"))
        lines += [f"  {e}" for e in result["errors"]]
    lines.append("=" * 50)
    return "\n".join(lines)


def run_serve_benchmark(cfg: Any, llm: Any = None) -> dict[str, Any]:
    """Against ``benchmark.url``, or a server started here on ``llm``'s engine."""
    bench = cfg.benchmark
    if bench.url:
        from ..config.preflight import check_benchmark_length
        from ..models.factory import create_factory

        config = create_factory(cfg.args).config if not bench.dataset else None
        if config is not None:
            check_benchmark_length(cfg, config)
        requests = make_requests(bench, getattr(config, "vocab_size", None))
        raw = run_client(str(bench.url), bench, requests, cfg.server.served_model_name)
        url = str(bench.url)
    else:
        import dataclasses

        from ..serve import serve

        requests = make_requests(bench, llm.engine.vocab_size)
        if cfg.server.name == "none":  # the benchmark's own server: any free loopback port
            cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, host="127.0.0.1", port=0))
        where: dict[str, str] = {}

        def client(server_url: str) -> dict:
            where["url"] = server_url
            return run_client(server_url, bench, requests)

        raw = serve(llm, cfg, client=client)
        if raw is None:  # stopped by a signal before the client finished
            raise RuntimeError("the serving benchmark was interrupted")
        url = where["url"]
    result = summarize(raw, bench, url)
    print(table(result), flush=True)
    return result


def jsonl_row(results: dict[str, Any]) -> dict[str, Any]:
    from .report import identity

    b = results["benchmark"]
    row = {**identity(results), "kind": "serve"}
    for key in ("request_rate", "max_concurrency", "num_prompts", "isl", "osl", "completed", "failed", "duration_s",
                "request_throughput", "output_tok_s", "total_tok_s", "peak_concurrency"):
        row[key] = b[key]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        for p in ("mean", "p50", "p99"):
            row[f"{key}_{p}"] = b[key].get(p)
    return row


def plot(bench: dict[str, Any], path: Path, title: str = "") -> Optional[Path]:
    """ITL over the run, and each request's TTFT and E2E latency at its start time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("benchmark.plot: matplotlib is not installed, no %s", path.name)
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    tr = bench["itl_trace"]
    left.scatter(tr["t_s"], tr["itl_ms"], s=4)
    left.set_xlabel("time in the benchmark (s)")
    left.set_ylabel("inter-token latency (ms)")
    if tr["itl_ms"] and min(tr["itl_ms"]) > 0:
        left.set_yscale("log")
    left.set_title(f"ITL (p50 {bench['itl_ms'].get('p50', 0):.2f} ms)")
    req = bench["requests_trace"]
    right.scatter(req["start_s"], req["ttft_ms"], s=8, label="TTFT")
    right.scatter(req["start_s"], req["e2e_ms"], s=8, label="E2E latency")
    right.set_xlabel("request sent at (s)")
    right.set_ylabel("ms")
    right.set_title(f"{bench['completed']} requests at rate {bench['request_rate']:g}/s, "
                    f"max concurrency {bench['max_concurrency']}: {bench['output_tok_s']:.1f} output tok/s")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_artifacts(results: dict[str, Any], out_dir: Path, bench_cfg: Any) -> dict[str, str]:
    from .report import save_artifacts

    return save_artifacts(results, out_dir, bench_cfg, [jsonl_row(results)], plot, "served on")


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m autodeploy.bench.serve ...``: ``launch.py benchmark=serve ...``."""
    from ..cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = any(a.lstrip("+").startswith("benchmark=") for a in argv)
    cli_main(argv if chosen else ["benchmark=serve", *argv])


if __name__ == "__main__":
    main()
