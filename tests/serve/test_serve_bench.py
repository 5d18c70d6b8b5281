"""The serving benchmark on the tiny Llama: a Hydra multirun over request rates (the server started by
each job), `python -m autodeploy.bench.serve` against a running server, vLLM's definitions, and the
isl + osl check against the model's positions."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from autodeploy.bench.serve import summarize

from serve_helpers import CPU_ARGS, ROOT, launch_argv

SMALL = ["benchmark.num_prompts=6", "benchmark.isl=24", "benchmark.osl=6", "benchmark.warmup=1"]


def test_multirun_over_request_rates_gives_the_sweep_summary(tmp_path):
    proc = subprocess.run(launch_argv("-m", "model=tiny_llama", "benchmark=serve", "benchmark.request_rate=20,inf",
                                      "benchmark.max_concurrency=4", *SMALL, *CPU_ARGS, f"hydra.sweep.dir={tmp_path}"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Serving Benchmark Result") == 2 and "Mean TPOT (ms):" in proc.stdout
    rates = []
    for job in ("0", "1"):
        run = tmp_path / job
        bench = json.loads((run / "results.json").read_text())["benchmark"]
        assert bench["kind"] == "serve" and (bench["completed"], bench["failed"]) == (6, 0)
        assert bench["total_input_tokens"] == 6 * 24 and bench["total_output_tokens"] == 6 * 6
        assert bench["output_tok_s"] > 0 and bench["request_throughput"] > 0 and 1 <= bench["peak_concurrency"] <= 4
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert 0 < bench[key]["p50"] <= bench[key]["p99"]
        assert bench["url"].startswith("http://127.0.0.1:")  # its own server on a free loopback port
        row = json.loads((run / "benchmark.jsonl").read_text().splitlines()[-1])
        assert row["kind"] == "serve" and row["output_tok_s"] == bench["output_tok_s"]
        assert (run / "benchmark.png").stat().st_size > 0
        rates.append(bench["request_rate"])
    assert sorted(rates) == [20.0, float("inf")]
    summary = (tmp_path / "summary.md").read_text()
    assert "request_throughput" in summary and "tpot_p50_ms" in summary and "2 jobs: 2 ok" in summary
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_module_entry_against_a_running_server(tmp_path, server):
    proc = subprocess.run([sys.executable, "-m", "autodeploy.bench.serve", "--model", "tiny_llama",
                           f"benchmark.url={server.url}", *SMALL, "benchmark.request_rate=50",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.loads((tmp_path / "results.json").read_text())["benchmark"]
    assert bench["url"] == server.url and bench["completed"] == 6 and bench["model"] == "tiny_llama"
    assert "build_s" not in json.loads((tmp_path / "results.json").read_text())  # no engine was built


def test_prompts_from_a_file(tmp_path, server, capsys):
    from autodeploy.bench.serve import run_serve_benchmark
    from autodeploy.config import compose_experiment

    data = tmp_path / "prompts.jsonl"
    data.write_text('"The capital of France is"\n{"prompt": [1, 40, 41], "max_tokens": 3}\n')
    cfg = compose_experiment(["benchmark=serve", f"benchmark.url={server.url}", f"benchmark.dataset={data}",
                              "benchmark.num_prompts=4", "benchmark.osl=5", "benchmark.warmup=0"])
    bench = run_serve_benchmark(cfg)
    assert bench["completed"] == 4 and bench["total_output_tokens"] == 5 + 3 + 5 + 3
    assert "Successful requests:                    4" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["benchmark=serve", "benchmark=latency"])
def test_isl_plus_osl_past_the_positions_is_an_error_before_model_work(kind):
    from autodeploy.config import ConfigError, compose_experiment, preflight

    cfg = compose_experiment(["model=tiny_llama", kind, "benchmark.isl=500", "benchmark.osl=100", "args.device=cpu",
                              "transforms/compile=torch-simple"])
    with pytest.raises(ConfigError, match="600 exceeds the model's max_position_embeddings=512.*"
                                          "benchmark.allow_past_max_position=true"):
        preflight(cfg)
    preflight(compose_experiment(["model=tiny_llama", kind, "benchmark.isl=500", "benchmark.osl=100", "args.device=cpu",
                                  "transforms/compile=torch-simple", "benchmark.allow_past_max_position=true"]))


def test_server_with_an_offline_benchmark_is_an_error(tmp_path):
    from autodeploy.config import ConfigError, compose_experiment, experiment
    from autodeploy.run import run

    cfg = experiment(compose_experiment(["server=openai", "benchmark=latency", "args.device=cpu"]))
    with pytest.raises(ConfigError, match="use benchmark=serve"):
        run(cfg, tmp_path)  # before any model work


def test_summary_follows_vllm_definitions():
    bench = SimpleNamespace(isl=4, osl=3, dataset=None, request_rate=2.0, max_concurrency=None, warmup=0)
    ok = {"ok": True, "error": "", "prompt_tokens": 4, "output_tokens": 3}
    raw = {"duration_s": 2.0, "peak_concurrency": 2, "records": [
        {**ok, "start_s": 0.0, "ttft_s": 0.1, "latency_s": 0.5, "itl_s": [0.2, 0.2]},
        {**ok, "start_s": 0.5, "ttft_s": 0.3, "latency_s": 0.9, "itl_s": [0.1, 0.5]},
        {"ok": False, "error": "HTTP 503: full", "start_s": 1.0, "ttft_s": None, "latency_s": None, "itl_s": [],
         "prompt_tokens": 0, "output_tokens": 0},
    ]}
    r = summarize(raw, bench)
    assert (r["completed"], r["failed"], r["errors"]) == (2, 1, ["HTTP 503: full"])
    assert r["request_throughput"] == 1.0 and r["output_tok_s"] == 3.0 and r["total_tok_s"] == 7.0
    assert r["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert sorted(r["tpot_ms"].values())[0] == pytest.approx(200.0)  # (0.5 - 0.1) / 2 and (0.9 - 0.3) / 2
    assert r["tpot_ms"]["mean"] == pytest.approx(250.0) and r["e2e_ms"]["mean"] == pytest.approx(700.0)
    assert r["itl_ms"]["mean"] == pytest.approx(250.0) and r["itl_trace"]["t_s"] == [0.3, 0.5, 0.9, 1.4]


def test_client_keeps_its_connections_and_splits_lines_at_line_feeds_only():
    """The benchmark's client reads each stream to its end, so requests reuse their connections
    (a connection per request cost 1-3 ms of TTFT), and a chunk whose JSON holds U+2028 (where
    httpx's aiter_lines would split the line) still parses."""
    import asyncio
    import threading

    from autodeploy.bench import serve_client

    text = json.dumps({"choices": [{"index": 0, "text": "a\u2028b\x85"}]}, ensure_ascii=False)
    events = [f"data: {text}\n\n", 'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
              "data: [DONE]\n\n"]
    body = "".join(f"{len(e.encode()):x}\r\n{e}\r\n" for e in events).encode() + b"0\r\n\r\n"
    connections = []

    async def handle(reader, writer):
        connections.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = int(next(line.split(":")[1] for line in head.split("\r\n")
                                  if line.lower().startswith("content-length")))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                             + body)
        except asyncio.IncompleteReadError:
            writer.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        raw = asyncio.run(serve_client.run(url, [{"prompt": [1, 2, 3], "max_tokens": 2}] * 6, "m", max_concurrency=2))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        for writer in connections:
            writer.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()
    records = raw["records"]
    assert [(r["ok"], r["output_tokens"], r["error"]) for r in records] == [(True, 2, "")] * 6
    assert len(connections) <= 2  # at most max_concurrency connections for six requests
