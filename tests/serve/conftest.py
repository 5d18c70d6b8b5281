"""One in-process server on the tiny Llama (CPU, loopback, a free port), shared by the endpoint tests."""

from __future__ import annotations

import threading
import time

import pytest
from serve_helpers import MAX_SEQ_LEN


@pytest.fixture(scope="session")
def server():
    from autodeploy import LLM
    from autodeploy.serve.server import Server

    llm = LLM("tiny_llama", device="cpu", compile_backend="torch-simple", max_batch_size=16,
              max_seq_len=MAX_SEQ_LEN, attn_page_size=16)
    srv = Server(llm.engine, "tiny_llama", port=0, shutdown_grace_s=5)
    # the engine loop on a thread of the test process (in `launch.py` it is the main thread)
    thread = threading.Thread(target=srv.run, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while srv._http is None or not srv._http.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield srv
    srv.stop(0)
    thread.join(30)
    assert not thread.is_alive()
    llm.shutdown()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
