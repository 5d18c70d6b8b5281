"""The serving benchmark's client: streamed completions against an OpenAI-compatible server, timed
per request and per chunk (as ``vllm bench serve`` times them).

It runs in a process of its own, ``python -m autodeploy.bench.serve_client SPEC.json OUT.json``,
so that its Python work never shares a GIL with the server it measures; it imports only the
standard library, aiohttp and tqdm. SPEC: ``{url, model, requests: [{prompt, max_tokens}],
request_rate, max_concurrency, warmup, seed}``; OUT: ``{duration_s, peak_concurrency, records: [...],
t0_perf_s}``.

aiohttp, as ``vllm bench serve``: httpx cost this client 0.6 ms of each TTFT (medians, tiny model on
the CPU: 0.46 ms to send a request and 0.41 ms to read its first chunk, against 0.24 and ~0 ms),
time that the offline TTFT it is compared with never pays.

Connections are kept alive: each stream is read to its end, so aiohttp reuses its connection. A
new TCP connection per request cost the client 1-3 ms of TTFT on the CPU machine, which the offline
TTFT it is compared with never pays; real clients (the ``openai`` package) keep their connections too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Optional

log = logging.getLogger("autodeploy")


@dataclass
class Record:
    """One request: seconds from the benchmark's start, or from the request's own start."""

    ok: bool = False
    error: str = ""
    start_s: float = 0.0  # sent, from the benchmark's start
    ttft_s: Optional[float] = None
    latency_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks that carried tokens
    prompt_tokens: int = 0
    output_tokens: int = 0


async def _request(session: Any, url: str, model: str, req: dict, t0: float) -> Record:
    rec = Record()
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    rec.start_s = start - t0
    last = end = None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")
                rec.error = f"HTTP {resp.status}: {text[:300]}"
                return rec
            async for line in _lines(resp):
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                now = time.perf_counter()
                if data == "[DONE]":
                    end = now  # read on to the end of the response: then the connection is reused
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = chunk["error"].get("message", str(chunk["error"]))
                    return rec
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    if last is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
        rec.latency_s = (end or time.perf_counter()) - start
        rec.ok = rec.ttft_s is not None
        if not rec.ok:
            rec.error = "the stream ended without a token"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, the benchmark goes on
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def _lines(resp: Any) -> AsyncIterator[str]:
    """The stream's lines, split at line feeds only: SSE ends lines with LF or CRLF, and a JSON
    string may hold U+2028 or U+0085 unescaped, where ``str.splitlines`` would split too (UTF-8
    has no other byte 0x0A, so the bytes split first). No length limit, unlike ``readline``."""
    rest = b""
    async for data in resp.content.iter_any():
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line.decode().removesuffix("\r")
    if rest:
        yield rest.decode()


async def _model(session: Any, url: str) -> str:
    async with session.get(f"{url}/v1/models", raise_for_status=True) as resp:
        return (await resp.json())["data"][0]["id"]


async def run(url: str, requests: list[dict], model: Optional[str] = None, request_rate: float = math.inf,
              max_concurrency: Optional[int] = None, warmup: int = 0, seed: int = 0) -> dict:
    """Send ``warmup`` untimed requests one by one, then ``requests`` at Poisson arrivals of
    ``request_rate`` per second (inf: all at once), at most ``max_concurrency`` in flight."""
    import aiohttp

    from .progress import Progress

    url = url.rstrip("/")
    connector = aiohttp.TCPConnector(limit=0)  # no cap: max_concurrency is the gate
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as client:
        model = model or await _model(client, url)
        for i in range(warmup):
            rec = await _request(client, url, model, requests[i % len(requests)], time.perf_counter())
            if not rec.ok:
                raise RuntimeError(f"warm-up request failed: {rec.error}")
        rng = random.Random(seed)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        in_flight = peak = 0
        progress = Progress(len(requests), "serve benchmark", unit="request")

        async def one(req: dict, t0: float) -> Record:
            nonlocal in_flight, peak
            async with gate if gate is not None else _nothing():
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await _request(client, url, model, req, t0)
                finally:
                    in_flight -= 1
                    progress.update()

        t0 = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.ensure_future(one(req, t0)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        progress.close()
    return {"model": model, "duration_s": duration, "peak_concurrency": peak, "records": [asdict(r) for r in records],
            "t0_perf_s": t0}  # the records' origin on this host's perf_counter (a server's probes can line up with it)


class _nothing:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def main(argv: list[str]) -> None:
    spec_path, out_path = argv
    handler = logging.StreamHandler(sys.stdout)  # progress lines, as the run's own log lines look
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    spec = json.loads(open(spec_path).read())
    result = asyncio.run(run(spec["url"], spec["requests"], spec.get("model"), float(spec["request_rate"]),
                             spec.get("max_concurrency"), int(spec.get("warmup", 0)), int(spec.get("seed", 0))))
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
