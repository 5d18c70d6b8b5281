"""The server: uvicorn on a thread of its own, the engine loop on the thread that built the engine.

``Server(engine, ...).run()`` listens, prints its address, steps the engine for every connection
and returns after SIGTERM/SIGINT: it stops accepting (the listening socket closes, ``/health`` and
new requests answer 503), lets in-flight requests finish within ``shutdown_grace_s``, aborts the
rest, and waits for the HTTP thread to send their last bytes. A second signal aborts at once.
With ``client``, a function of the server's URL runs on a thread once it listens, and the server
stops when it returns (the serving benchmark).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from typing import Any, Callable, Optional

from ..config.errors import UserError
from .engine_loop import SHUTDOWN_MESSAGE, EngineLoop
from .metrics import ServerMetrics
from .protocol import RequestError

log = logging.getLogger("autodeploy.serve")


class Server:
    def __init__(self, engine: Any, model_name: str, *, model_root: Optional[str] = None, host: str = "127.0.0.1",
                 port: int = 8000, max_waiting_requests: int = 1024, api_key: Optional[str] = None,
                 shutdown_grace_s: float = 30.0):
        from .app import build_app

        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.vocab_size
        self.max_seq_len = engine.cache.max_seq_len
        self.model_name, self.model_root = model_name, model_root or model_name
        self.host, self.port = host, port
        self.max_waiting_requests = max_waiting_requests
        self.api_key = api_key
        self.shutdown_grace_s = shutdown_grace_s
        self.started = int(time.time())
        self.metrics = ServerMetrics(model_name, running=lambda: self.loop.num_running,
                                     waiting=lambda: self.loop.num_waiting, kv_usage=lambda: self.loop.kv_cache_usage)
        self.loop = EngineLoop(engine, self.metrics)
        self.app = build_app(self)
        self.url: Optional[str] = None
        self._http = None

    @classmethod
    def from_config(cls, engine: Any, cfg: Any) -> "Server":
        """From the experiment config: its ``server`` node, the model named by ``cfg.model``."""
        s = cfg.server
        return cls(engine, s.served_model_name or str(cfg.model), model_root=str(cfg.model), host=s.host,
                   port=int(s.port), max_waiting_requests=int(s.max_waiting_requests), api_key=s.api_key,
                   shutdown_grace_s=float(s.shutdown_grace_s))

    # ---- checks the endpoints make ----

    def authorize(self, request: Any) -> None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise RequestError("invalid or missing API key (Authorization: Bearer <key>)", 401, code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise RequestError(f"model {name!r} not found: this server serves {self.model_name!r}", 404, param="model",
                               code="model_not_found")

    def admit(self, count: int) -> None:
        if self.loop.draining or self.loop.stop_requested.is_set():
            raise RequestError(SHUTDOWN_MESSAGE, 503)
        if self.loop.num_waiting + count > self.max_waiting_requests:
            raise RequestError(f"too many requests waiting (server.max_waiting_requests={self.max_waiting_requests}): "
                               "retry later", 503)

    # ---- running ----

    def run(self, client: Optional[Callable[[str], Any]] = None) -> Any:
        """Serve until a signal (or until ``client(url)`` returns: its result is returned)."""
        import uvicorn

        sock = self._listen()
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=int(self.shutdown_grace_s) + 10)
        self._http = uvicorn.Server(config)
        http = threading.Thread(target=self._http.run, kwargs={"sockets": [sock]}, name="autodeploy-http", daemon=True)
        outcome: dict[str, Any] = {}
        with self._signals():
            http.start()
            self._wait_listening(http)
            line = f"[serve ] {self.model_name} at {self.url}/v1 (OpenAI API); SIGTERM or Ctrl-C stops it"
            print(line, flush=True)
            log.info("%s", line)
            if client is not None:
                threading.Thread(target=self._client, args=(client, outcome), name="autodeploy-client",
                                 daemon=True).start()
            try:
                self.loop.run(on_drain=self._stop_http)
            finally:
                self._stop_http()
                http.join(timeout=self.shutdown_grace_s + 15)
                sock.close()
        log.info("server stopped")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    def stop(self, grace_s: Optional[float] = None) -> None:
        """Stop as SIGTERM does (from any thread)."""
        self.loop.request_stop(self.shutdown_grace_s if grace_s is None else grace_s)

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto given: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP (0 by default);
        # without it Nagle holds each streamed chunk until the client's delayed ACK (~40 ms)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise UserError(f"server.host={self.host} server.port={self.port}: cannot listen there: {e.strerror or e}"
                            ) from None
        sock.listen(2048)
        sock.set_inheritable(True)
        port = sock.getsockname()[1]
        host = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        self.url = f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else host}:{port}"
        return sock

    def _wait_listening(self, http: threading.Thread) -> None:
        while not self._http.started:
            if not http.is_alive():
                raise RuntimeError("the HTTP server thread ended before it listened (see the log above)")
            time.sleep(0.01)

    def _stop_http(self) -> None:
        if self._http is not None:
            self._http.should_exit = True  # closes the listening socket; open responses finish

    def _client(self, client: Callable[[str], Any], outcome: dict) -> None:
        try:
            outcome["result"] = client(self.url)
        except BaseException as e:  # noqa: BLE001 - handed to run(), which raises it after the shutdown
            outcome["error"] = e
        finally:
            self.stop()

    @contextlib.contextmanager
    def _signals(self):
        """SIGTERM/SIGINT stop the server (a second one aborts at once); only the main thread can listen."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        seen = []

        def handle(signum, _frame):
            seen.append(signum)
            name = signal.Signals(signum).name
            if len(seen) == 1:
                print(f"[serve ] {name}: stopping (in-flight requests may finish within {self.shutdown_grace_s:g} s; "
                      "again to abort them)", flush=True)
                self.stop()
            else:
                print(f"[serve ] {name}: aborting in-flight requests", flush=True)
                self.stop(0.0)

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
