"""Servers as a user starts them (`autodeploy serve`, `launch.py server=openai`), in processes of their
own: SIGTERM drains in-flight requests and exits 0; a world_size-2 server answers like one rank and a
terminal's Ctrl-C (SIGINT to the process group) ends it and its worker rank."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import httpx

from serve_helpers import CPU_ARGS, ServerProcess, alive, launch_argv


def _serve_cli() -> list[str]:
    script = Path(sys.executable).parent / "autodeploy"  # the console script pip installed
    return [str(script), "serve"] if script.is_file() else [sys.executable, "-m", "autodeploy.cli", "serve"]


def _stream(url: str, body: dict, out: dict) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as resp:
            out["status"] = resp.status_code
            out["events"] = []
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    out["events"].append(line[6:])
    except Exception as e:  # noqa: BLE001 - reported by the test's assertions
        out["error"] = repr(e)


def test_sigterm_finishes_in_flight_aborts_the_rest_and_exits_0(tmp_path):
    srv = ServerProcess([*_serve_cli(), "tiny_llama", "--port", "0", "--max-model-len", "4096",
                         "server.shutdown_grace_s=3", *CPU_ARGS, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    try:
        long: dict = {}
        body = {"model": "tiny_llama", "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
        reader = threading.Thread(target=_stream, args=(srv.url, body, long))
        reader.start()
        while len(long.get("events", [])) < 2:  # it is generating
            assert reader.is_alive(), long
            time.sleep(0.05)
        short: dict = {}

        def short_request():
            short["resp"] = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
                "model": "tiny_llama", "prompt": "Hi", "max_tokens": 4, "ignore_eos": True})

        sender = threading.Thread(target=short_request)
        sender.start()
        time.sleep(0.3)  # the short request is in the engine too
        srv.signal(signal.SIGTERM)
        t0 = time.monotonic()
        refused = None
        while time.monotonic() - t0 < 2.5 and refused is None:  # it stops accepting at once
            try:
                r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny_llama", "prompt": "x"}, timeout=2)
                refused = r.status_code == 503 or None
            except httpx.TransportError:
                refused = True
            time.sleep(0.1)
        assert refused, "a new request was still accepted after SIGTERM"
        sender.join(60)
        reader.join(60)
        code = srv.wait(60)
    finally:
        srv.kill()
    out = srv.output()
    assert code == 0, out[-3000:]
    # the short request finished within the grace period; the long one was aborted at its end
    assert short["resp"].status_code == 200 and short["resp"].json()["usage"]["completion_tokens"] == 4
    events = long["events"]
    assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
    assert 2 <= len(events) - 2 < 4000
    assert "SIGTERM: stopping" in out and "aborting 1 requests" in out and "server stopped" in out
    assert (tmp_path / "run" / "results.json").is_file()


def test_world_size_2_server_and_ctrl_c(tmp_path, server):
    srv = ServerProcess(launch_argv("model=tiny_llama", "server=openai", "server.port=0", "args.world_size=2", *CPU_ARGS,
                                    f"hydra.run.dir={tmp_path / 'run'}"), tmp_path)
    try:
        workers = srv.children()
        assert workers, "rank 0 has no worker process"
        body = {"model": "tiny_llama", "prompt": [1, 40, 41, 42, 43], "max_tokens": 10, "temperature": 0,
                "ignore_eos": True}
        two_ranks = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        one_rank = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert two_ranks == one_rank  # tensor-parallel over 2 ranks: the same greedy text
        streamed: dict = {}
        _stream(srv.url, body, streamed)
        text = "".join(json.loads(e)["choices"][0]["text"] for e in streamed["events"][:-1])
        assert text == two_ranks
        srv.signal(signal.SIGINT, group=True)  # Ctrl-C in a terminal: every process of the group
        code = srv.wait(90)
    finally:
        srv.kill()
    assert code == 0, srv.output()[-3000:]
    assert "SIGINT: stopping" in srv.output()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "a worker rank outlived the server"
