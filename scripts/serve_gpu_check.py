"""Serving overhead on one GPU: the offline benchmark and the OpenAI server, on one engine, in one run.

    PYTHONUNBUFFERED=1 python3 scripts/serve_gpu_check.py --out DIR [--model llama3_8b] [--num 3]
        [--isl 1024] [--osl 128] [--set key=value ...] [--c1-only] [--uvicorn http=h11,loop=asyncio] [--switch-interval S]

One build (the 8B shape, random bf16 weights, triton attention, torch-opt with CUDA graphs for
batches 1 and 32), then on that engine:
1. the offline benchmark (bench/benchmark.py) at batch 1 and 32: ``warmup`` + ``num`` rounds;
2. the server (port 0, loopback) with the serving benchmark's client in a process of its own
   (bench/serve_client.py, connections kept alive): concurrency 1 (2 untimed requests, then
   ``8 * num`` timed ones) and 32 (one untimed pass of 32 requests at concurrency 32, as the
   offline batch 32 has its untimed rounds, then ``32 * num`` timed ones, all at once, at most 32
   in flight), random prompts of ``isl`` tokens, exactly ``osl`` tokens each.
Prints the table of issue 23's targets (TPOT and TTFT at c=1 against batch 1; output tok/s at c=32
against batch 32) and, for every server phase, what the engine and the threads did meanwhile
(``Probe``): engine steps by kind and their host time, the engine's idle time and its longest
stall, garbage-collector pauses, kernels and graphs compiled during the phase, CUDA-graph replays
against eager steps, and the CPU time of the HTTP thread per token; and, at concurrency 1, where
each request's time to first token goes (``Phases``: client and TCP, uvicorn, JSON and pydantic,
tokenizing, the hand-off to the engine thread, the engine, the hand-back to the event loop, the SSE
write, the client's read; medians and means over the requests). ``--c1-only`` runs batch 1 and concurrency 1 alone (the TTFT work;
``--num 25``: 200 served requests); ``--uvicorn`` sets uvicorn's HTTP parser or event loop for a
comparison (default: httptools and uvloop where installed). Everything goes to
DIR/serve_check.json. On a machine without CUDA it runs the tiny Llama on the CPU (``--model
tiny_llama``): a check of the script, not of the targets.

Both throughputs are output tokens over wall time with the ramp included: offline, a round's
``bs * osl`` over the time from its submission to its last token (median of ``num`` rounds); through
the server, every request's tokens over the time from the first request sent to the last one done
(``num`` waves of 32, each new request sent when one finishes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf


def offline(engine, bs: int, args) -> dict:
    from autodeploy.bench.benchmark import run_batch_size

    cfg = SimpleNamespace(isl=args.isl, osl=args.osl, num=args.num, warmup=2)
    r = run_batch_size(engine, cfg, bs)
    return {"ttft_ms_p50": r["ttft_ms"]["p50"], "tpot_ms_p50": r["tpot_ms"]["p50"], "itl_ms_p50": r["itl_ms"]["p50"],
            "output_tok_s": r["output_tok_s"], "decode_tok_s": r["decode_tok_s"]}


class Probe:
    """What the server's engine loop and threads do during a phase: the engine's ``step`` and the
    loop's inbox wait are wrapped on their instances (the product code is untouched)."""

    def __init__(self, server):
        """On the thread that will run ``server.run`` (it steps the engine)."""
        self.engine, self.loop = server.engine, server.loop
        self.engine_thread = threading.current_thread().name
        self.calls: list[tuple[float, float]] = []  # each engine.step() call: start, end
        self.idle = 0.0  # the loop blocked on its inbox: nothing to run
        self.pauses: list[tuple[int, float]] = []  # garbage collections: generation, seconds
        step, take = self.engine.step, self.loop._take_inbox

        def timed_step():
            t0 = time.perf_counter()
            try:
                return step()
            finally:
                self.calls.append((t0, time.perf_counter()))

        def timed_take(block: bool):
            t0 = time.perf_counter()
            try:
                return take(block)
            finally:
                if block:
                    self.idle += time.perf_counter() - t0

        self.engine.step, self.loop._take_inbox = timed_step, timed_take
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._gc_start))

    def start(self) -> None:
        self.calls.clear()
        self.pauses.clear()
        self.idle = 0.0
        self.engine.step_timings.clear()
        self._t0, self._cpu0, self._compiled0 = time.perf_counter(), thread_cpu(), compiled()
        self._graphs0 = graph_counters(self.engine.model)

    def stop(self, output_tokens: int) -> dict:
        wall = time.perf_counter() - self._t0
        cpu, compiled1, graphs1 = thread_cpu(), compiled(), graph_counters(self.engine.model)
        steps = list(self.engine.step_timings)
        decode = [s for s in steps if s.is_decode]
        prompt = [s for s in steps if not s.is_decode]
        gaps = [b[0] - a[1] for a, b in zip(self.calls, self.calls[1:])]
        http = cpu.get("autodeploy-http", 0.0) - self._cpu0.get("autodeploy-http", 0.0)
        engine_thread = self.engine_thread
        return {
            "wall_s": wall, "engine_idle_s": self.idle, "steps": len(steps), "decode_steps": len(decode),
            "prompt_steps": len(prompt), "mean_batch": statistics.mean(s.num_seqs for s in steps) if steps else 0.0,
            "decode_host_ms_p50": _p50([s.host_s * 1e3 for s in decode]),
            "prompt_host_ms_p50": _p50([s.host_s * 1e3 for s in prompt]),
            "prompt_host_s": sum(s.host_s for s in prompt), "prompt_wait_s": sum(s.wait_s for s in prompt),
            "longest_step_call_ms": max((b - a for a, b in self.calls), default=0.0) * 1e3,
            "longest_gap_between_steps_ms": max(gaps, default=0.0) * 1e3,
            "gc_pauses": len(self.pauses), "gc_full": sum(g == 2 for g, _ in self.pauses),
            "gc_max_ms": max((d for _, d in self.pauses), default=0.0) * 1e3,
            "gc_total_ms": sum(d for _, d in self.pauses) * 1e3,
            "compiled_during": {k: compiled1[k] - self._compiled0.get(k, 0) for k in compiled1},
            "graphs_during": {k: graphs1[k] - self._graphs0.get(k, 0) for k in graphs1},
            "http_cpu_us_per_token": http * 1e6 / max(output_tokens, 1),
            "engine_thread_cpu_s": cpu.get(engine_thread, 0.0) - self._cpu0.get(engine_thread, 0.0),
        }


class Phases:
    """Where each request's time to first token goes, request by request (concurrency 1): host
    timestamps (``time.perf_counter``, CLOCK_MONOTONIC on Linux, so the client's process shares
    it) taken by wrapping the app, the endpoints' helpers and the engine loop's methods (the
    product code is untouched). Only the requests of a ``start``/``stop`` window count; with
    several in flight the stamps would mix, so ``stop`` reports only at concurrency 1."""

    NAMES = [  # phase: from the stamp before to this one
        ("received", "client sends -> the server's socket has bytes (client, TCP)"),
        ("client_to_app", "-> the app is called (uvicorn parses the request)"),
        ("body", "-> body received"),
        ("parse", "-> JSON parsed + pydantic validated"),
        ("tokenize", "-> prompt tokenized"),
        ("to_submit", "-> handed to the engine loop (submit)"),
        ("handoff", "-> the engine thread admits it"),
        ("admit", "-> admitted (add_request)"),
        ("to_step", "-> its first step starts"),
        ("engine", "-> its first token lands (engine)"),
        ("publish", "-> its update is sent to the event loop"),
        ("handback", "-> the event loop delivers it"),
        ("sse", "-> its chunk reaches the ASGI send"),
        ("write", "-> uvicorn wrote it"),
        ("client_read", "-> the client has read it"),
    ]

    def __init__(self, server):
        """Before ``server.run`` (it wraps ``server.app``)."""
        import autodeploy.serve.app as app_module
        import autodeploy.serve.engine_loop as loop_module

        self.records: list[dict] = []
        self.on = False
        app, loop = server.app, server.loop
        cur = lambda: self.records[-1] if self.on and self.records else {}  # noqa: E731

        def stamp(key: str) -> None:
            cur().setdefault(key, time.perf_counter())

        async def timed_app(scope, receive, send):
            if not (self.on and scope["type"] == "http" and scope["path"] == "/v1/completions"):
                return await app(scope, receive, send)
            self.records.append({"client_to_app": time.perf_counter(), "received": self._received})
            self.stack = f"{self._protocol} on {type(asyncio.get_running_loop()).__module__}"  # uvicorn's choice

            async def timed_receive():
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body"):
                    stamp("body")
                return message

            async def timed_send(message):
                first = message["type"] == "http.response.body" and message.get("body", b"")[:7] == b"data: {"
                if first:
                    stamp("sse")
                await send(message)
                if first:
                    stamp("write")

            return await app(scope, timed_receive, timed_send)

        server.app = timed_app
        self._received, self._protocol, self.stack = None, None, None
        for module, name in (("h11_impl", "H11Protocol"), ("httptools_impl", "HttpToolsProtocol")):
            try:
                protocol = getattr(__import__(f"uvicorn.protocols.http.{module}", fromlist=[name]), name)
            except ImportError:  # that HTTP implementation is not installed
                continue
            protocol.data_received = self._stamp_received(protocol.data_received)

        def after(fn, key):
            def wrapped(*a, **k):
                out = fn(*a, **k)
                stamp(key)
                return out
            return wrapped

        async def parse(*a, **k):
            out = await parse0(*a, **k)
            stamp("parse")
            return out

        parse0 = app_module._parse
        app_module._parse, app_module._tokens = parse, after(app_module._tokens, "tokenize")
        submit, admit, send_, deliver = loop.submit, loop._admit, loop._send, loop_module._deliver_all

        def timed_submit(handles):
            stamp("to_submit")
            return submit(handles)

        def timed_admit(handles):
            stamp("handoff")
            out = admit(handles)
            stamp("admit")
            if handles and handles[0].request is not None:
                cur()["request"] = handles[0].request
            return out

        def timed_send(updates):
            if any(u.new_token_ids for _, u in updates):
                stamp("publish")
            return send_(updates)

        def timed_deliver(items, written=None):
            if any(u.new_token_ids for _, u in items):
                stamp("handback")
            return deliver(items, written)

        loop.submit, loop._admit, loop._send, loop_module._deliver_all = timed_submit, timed_admit, timed_send, timed_deliver
        step = server.engine.step  # Probe's wrapper, when it came first

        def timed_step():
            if "admit" in cur():
                stamp("to_step")
            return step()

        server.engine.step = timed_step

    def _stamp_received(self, data_received):
        def wrapped(protocol, data: bytes) -> None:
            self._received, self._protocol = time.perf_counter(), type(protocol).__name__
            return data_received(protocol, data)
        return wrapped

    def start(self) -> None:
        self.records.clear()
        self.on = True

    def stop(self, raw: dict) -> dict | None:
        """Phase medians (ms) over the timed requests (the client's records: the last ones seen)."""
        self.on = False
        client = [r for r in raw["records"] if r["ok"]]
        if raw.get("peak_concurrency") != 1 or "t0_perf_s" not in raw or not client:
            return None
        t0, rows = raw["t0_perf_s"], []
        for c, s in zip(client, self.records[-len(client):]):
            r = s.pop("request", None)
            if r is None or not r.metrics.token_times:
                continue
            sent = t0 + c["start_s"]
            s = {"sent": sent, **s, "engine": r.metrics.token_times[0], "client_read": sent + c["ttft_s"]}
            keys = ["sent"] + [k for k, _ in self.NAMES]
            if any(k not in s for k in keys):
                continue
            row = {k: (s[k] - s[prev]) * 1e3 for prev, k in zip(keys, keys[1:])}
            row["ttft"] = c["ttft_s"] * 1e3
            row["engine_ttft"] = (r.metrics.token_times[0] - s["handoff"]) * 1e3  # as offline counts it: from add_request
            rows.append(row)
        if not rows:
            return None
        return {"requests": len(rows), "http": self.stack, "p50_ms": {k: statistics.median(row[k] for row in rows) for k in rows[0]},
                "mean_ms": {k: statistics.mean(row[k] for row in rows) for k in rows[0]}}


def phases_table(phases: dict, offline_ttft_ms: float) -> str:
    p, m = phases["p50_ms"], phases["mean_ms"]
    lines = [f"TTFT by phase at c=1 over {phases['requests']} requests, {phases['http']} (ms; means add up to the TTFT, "
             "medians need not):",
             f"  {'':<66}{'median':>8}{'mean':>8}"]
    for key, name in Phases.NAMES:
        lines.append(f"  {name:<66}{p[key]:>8.3f}{m[key]:>8.3f}")
    lines.append(f"  {'served TTFT (client)':<66}{p['ttft']:>8.3f}{m['ttft']:>8.3f}")
    lines.append(f"  {'  of it the engine: admit -> first token (as offline counts it)':<66}"
                 f"{p['engine_ttft']:>8.3f}{m['engine_ttft']:>8.3f}")
    lines.append(f"  {'offline TTFT p50, same engine':<66}{offline_ttft_ms:>8.3f}")
    return "\n".join(lines)


def _p50(values: list) -> float | None:
    return statistics.median(values) if values else None


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process by name (Linux: /proc/self/task/*/schedstat, ns)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        name = names.get(int(tid), f"tid-{tid}")
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def compiled() -> dict[str, int]:
    """Kernels and graphs compiled so far: Triton JIT kernels of autodeploy's modules, dynamo graphs."""
    kernels = 0
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        JITFunction = None
    if JITFunction is not None:
        for name, module in list(sys.modules.items()):
            if name.startswith("autodeploy") and module is not None:
                for obj in list(vars(module).values()):
                    if isinstance(obj, JITFunction):
                        caches = getattr(obj, "device_caches", None) or {}
                        kernels += sum(len(c[0]) for c in caches.values())
    from torch._dynamo.utils import counters

    return {"triton_kernels": kernels, "dynamo_graphs": int(counters["stats"].get("unique_graphs", 0))}


def graph_counters(model) -> dict[str, int]:
    """The CUDA-graph runner's counts (compile/cudagraph.py): decode replays, prefill replays, eager steps."""
    return {k: int(getattr(model, k)) for k in ("num_replays", "num_prefill_replays", "num_eager") if hasattr(model, k)}


def served(url: str, engine, probe: Probe, concurrency: int, num_prompts: int, args, warmup: int = 2,
           phases: Phases | None = None) -> dict:
    from autodeploy.bench.serve import random_requests, run_client, summarize, table

    bench = SimpleNamespace(isl=args.isl, osl=args.osl, request_rate=float("inf"), max_concurrency=concurrency,
                            warmup=warmup, seed=concurrency, dataset=None)
    requests = random_requests(num_prompts, args.isl, args.osl, engine.vocab_size, seed=concurrency + num_prompts)
    probe.start()
    if phases is not None:
        phases.start()
    raw = run_client(url, bench, requests)
    result = summarize(raw, bench, url)
    diag = probe.stop(result["total_output_tokens"])
    ttft_phases = phases.stop(raw) if phases is not None else None
    print(table(result), flush=True)
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} requests failed: {result['errors']}")
    return {"ttft_ms_p50": result["ttft_ms"]["p50"], "tpot_ms_p50": result["tpot_ms"]["p50"],
            "itl_ms_p50": result["itl_ms"]["p50"], "output_tok_s": result["output_tok_s"],
            "num_prompts": num_prompts, "duration_s": result["duration_s"], "ttft_ms": result["ttft_ms"],
            "probe": diag, "ttft_phases": ttft_phases}


def describe(name: str, s: dict) -> str:
    d = s["probe"]
    host = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"{name}: {s['output_tok_s']:.1f} tok/s over {s['duration_s']:.2f} s, TTFT p50/mean/p99 "
            f"{s['ttft_ms']['p50']:.1f}/{s['ttft_ms']['mean']:.1f}/{s['ttft_ms']['p99']:.1f} ms\n"
            f"  engine: {d['steps']} steps ({d['decode_steps']} decode-only, {d['prompt_steps']} with prompt tokens), "
            f"mean batch {d['mean_batch']:.1f}, host ms p50 decode {host(d['decode_host_ms_p50'])} / with prompts "
            f"{host(d['prompt_host_ms_p50'])}, idle {d['engine_idle_s']:.2f} s of {d['wall_s']:.2f} s, longest step "
            f"call {d['longest_step_call_ms']:.1f} ms, longest gap between steps {d['longest_gap_between_steps_ms']:.1f} ms\n"
            f"  during it: compiled {d['compiled_during']}, graphs {d['graphs_during']}, gc {d['gc_pauses']} pauses "
            f"({d['gc_full']} full, max {d['gc_max_ms']:.1f} ms, {d['gc_total_ms']:.1f} ms in all); HTTP thread "
            f"{d['http_cpu_us_per_token']:.1f} us CPU per token, engine thread {d['engine_thread_cpu_s']:.2f} s CPU")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="llama3_8b" if torch.cuda.is_available() else "tiny_llama")
    parser.add_argument("--num", type=int, default=3)
    parser.add_argument("--isl", type=int, default=1024 if torch.cuda.is_available() else 64)
    parser.add_argument("--osl", type=int, default=128 if torch.cuda.is_available() else 16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="LLM keyword overrides, dotted")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads on the CPU: the server's HTTP thread and the client need cores too (a "
                             "2-core machine with 2 intra-op threads ran even the offline batch 1 ~80x slower)")
    parser.add_argument("--c1-only", action="store_true",
                        help="only batch 1 offline and concurrency 1 served (the TTFT phases), with --num 25: "
                             "200 served requests")
    parser.add_argument("--uvicorn", default="", metavar="KEY=VALUE,...",
                        help="uvicorn.Config settings for a comparison, e.g. http=h11,loop=asyncio (default: uvicorn's "
                             "choice: httptools and uvloop where installed)")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="S",
                        help="sys.setswitchinterval for a comparison (Python's default: 0.005 s)")
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.uvicorn:
        import uvicorn

        settings = dict(kv.split("=", 1) for kv in args.uvicorn.split(","))
        init = uvicorn.Config.__init__
        uvicorn.Config.__init__ = lambda self, *a, **k: init(self, *a, **{**k, **settings})
    if not torch.cuda.is_available():
        torch.set_num_threads(args.cpu_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from autodeploy import LLM
    from autodeploy.serve.server import Server

    gpu = dict(attn_backend="triton", compile_backend="torch-opt", cuda_graph_batch_sizes=[1, 32], free_mem_ratio=0.3)
    cpu = dict(device="cpu", compile_backend="torch-simple", attn_page_size=16)
    kwargs = {**(gpu if torch.cuda.is_available() else cpu), "max_seq_len": args.isl + args.osl,
              **OmegaConf.to_container(OmegaConf.from_dotlist(args.set))}
    t0 = time.perf_counter()
    llm = LLM(args.model, max_batch_size=32, **kwargs)
    engine = llm.engine
    record = {"model": args.model, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "kwargs": kwargs, "isl": args.isl, "osl": args.osl, "build_s": time.perf_counter() - t0,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record["offline_bs1"] = offline(engine, 1, args)
    if not args.c1_only:
        record["offline_bs32"] = offline(engine, 32, args)

    server = Server(engine, args.model, port=0, shutdown_grace_s=5)
    probe = Probe(server)
    phases = Phases(server)

    def client(url: str) -> dict:
        out = {"c1": served(url, engine, probe, 1, 8 * args.num, args, phases=phases)}
        if not args.c1_only:
            out["c32_warmup"] = served(url, engine, probe, 32, 32, args, warmup=0)  # untimed, as offline's warm-up
            out["c32"] = served(url, engine, probe, 32, 32 * args.num, args, warmup=0)
        return out

    record.update(server.run(client))
    llm.shutdown()
    (args.out / "serve_check.json").write_text(json.dumps(record, indent=2))

    o1, s1 = record["offline_bs1"], record["c1"]
    rows = [
        ("TPOT p50 (ms), c=1 vs bs 1", o1["tpot_ms_p50"], s1["tpot_ms_p50"], s1["tpot_ms_p50"] / o1["tpot_ms_p50"],
         "server/offline <= 1.05", lambda x: x <= 1.05),
        ("TTFT p50 (ms), c=1 vs bs 1", o1["ttft_ms_p50"], s1["ttft_ms_p50"], s1["ttft_ms_p50"] - o1["ttft_ms_p50"],
         "server - offline <= 2 ms", lambda x: x <= 2.0),
    ]
    if not args.c1_only:
        o32, s32 = record["offline_bs32"], record["c32"]
        rows.append(("output tok/s, c=32 vs bs 32", o32["output_tok_s"], s32["output_tok_s"],
                     s32["output_tok_s"] / o32["output_tok_s"], "server/offline >= 0.90", lambda x: x >= 0.90))
    print(f"\n==== serving vs offline: {args.model} on {record['device']}, isl {args.isl}, osl {args.osl}")
    print(f"{'figure':<30}{'offline':>10}{'server':>10}{'ratio/diff':>12}  target")
    for name, off, srv, ratio, target, ok in rows:
        print(f"{name:<30}{off:>10.2f}{srv:>10.2f}{ratio:>12.3f}  {target} {'PASS' if ok(ratio) else 'MISS'}")
    for name in ("c1",) if args.c1_only else ("c1", "c32_warmup", "c32"):
        print(describe(name, record[name]))
    if s1["ttft_phases"] is not None:
        print(phases_table(s1["ttft_phases"], o1["ttft_ms_p50"]))
    result = (f"RESULT serve_check tpot_ratio={rows[0][3]:.3f} ttft_diff_ms={rows[1][3]:.2f} "
              f"c1_itl_p50_ms={s1['itl_ms_p50']:.2f} bs1_itl_p50_ms={o1['itl_ms_p50']:.2f}")
    if not args.c1_only:
        result += (f" tok_s_ratio={rows[2][3]:.3f} "
                   f"c32_warmup_tok_s_ratio={record['c32_warmup']['output_tok_s'] / o32['output_tok_s']:.3f}")
    print(result)

if __name__ == "__main__":
    main()
