"""The OpenAI-compatible server on the engine a run builds (``server=openai``, ``autodeploy serve``).

    from autodeploy.serve import serve
    serve(llm, cfg)            # until SIGTERM/SIGINT, with the experiment's `server` settings

Layout: ``server.py`` (threads, listening, shutdown), ``engine_loop.py`` (the engine's thread),
``app.py`` (the endpoints), ``protocol.py`` (request bodies, errors), ``text.py`` (streamed text),
``logprobs.py`` (OpenAI's logprobs shapes), ``metrics.py`` (Prometheus).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..config.errors import ConfigError


def check_installed() -> None:
    """The serve extra's packages, before any model work."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"serving needs {', '.join(missing)}: pip install 'autodeploy[serve]'")


def serve(llm: Any, cfg: Any, client: Optional[Callable[[str], Any]] = None) -> Any:
    """Serve ``llm``'s engine with ``cfg.server``'s settings until SIGTERM/SIGINT, or until
    ``client(url)`` returns (its result is returned)."""
    from .server import Server

    return Server.from_config(llm.engine, cfg).run(client)
