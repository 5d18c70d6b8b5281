"""Every endpoint of the OpenAI-compatible server through the official `openai` client (and httpx
where a client must misbehave), on one in-process server (conftest.py): greedy streamed text equals
non-streamed text, many concurrent requests share the batch, a disconnect frees its request, bad
requests get their codes and the server goes on serving."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest


from serve_helpers import MAX_SEQ_LEN

GREEDY = dict(temperature=0, max_tokens=12)
PROMPTS = ["The capital of France is", "Hello, my name is", [1, 40, 41, 42, 43]]


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(autodeploy:[a-z_]+)\{model_name="tiny_llama"\} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_idle(server, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["autodeploy:num_requests_running"] == 0 and m["autodeploy:num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"requests still running: {m}"
        time.sleep(0.05)


def test_models_health_version_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny_llama"]
    assert models.data[0].model_extra["max_model_len"] == MAX_SEQ_LEN
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    resp = httpx.get(f"{server.url}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total"):
        assert f"autodeploy:{name}{{" in resp.text
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert f"# TYPE autodeploy:{name} histogram" in resp.text and f"autodeploy:{name}_bucket{{" in resp.text


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "text2", "token_ids"])
def test_completion_streamed_equals_non_streamed(server, client, prompt):
    before = metrics(server)
    full = client.completions.create(model="tiny_llama", prompt=prompt, **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens >= 4
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny_llama", prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    after = wait_idle(server)
    n = 2 * full.usage.completion_tokens
    assert after["autodeploy:generation_tokens_total"] - before["autodeploy:generation_tokens_total"] == n
    assert after["autodeploy:prompt_tokens_total"] - before["autodeploy:prompt_tokens_total"] == 2 * full.usage.prompt_tokens


def test_completion_list_of_prompts_gives_a_choice_each(client):
    single = [client.completions.create(model="tiny_llama", prompt=p, **GREEDY).choices[0].text for p in PROMPTS[:2]]
    batch = client.completions.create(model="tiny_llama", prompt=PROMPTS[:2], **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1] and [c.text for c in batch.choices] == single
    streamed = ["", ""]
    for chunk in client.completions.create(model="tiny_llama", prompt=PROMPTS[:2], stream=True, **GREEDY):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == single


def test_stop_string_cut_alike_streamed_and_not(client):
    text = client.completions.create(model="tiny_llama", prompt=PROMPTS[0], **GREEDY).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]  # a stop string that the greedy text reaches
    assert len(stop) == 2
    cut = client.completions.create(model="tiny_llama", prompt=PROMPTS[0], stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and text.startswith(cut.text)
    streamed = client.completions.create(model="tiny_llama", prompt=PROMPTS[0], stop=[stop], stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_chat_streamed_equals_non_streamed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model="tiny_llama", messages=messages, **GREEDY)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content and full.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model="tiny_llama", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == msg.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    # max_completion_tokens (OpenAI's newer name) and content given as parts
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colors."}]}]
    short = client.chat.completions.create(model="tiny_llama", messages=parts, temperature=0, max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3


def test_sampling_params_reach_the_engine(client):
    kwargs = dict(model="tiny_llama", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kwargs, extra_body={"top_k": 50}).choices[0].text
    b = client.completions.create(seed=7, **kwargs, extra_body={"top_k": 50}).choices[0].text
    assert a == b  # the same seed, the same text
    texts = {client.completions.create(seed=s, **kwargs).choices[0].text for s in range(4)}
    assert len(texts) > 1  # seeds differ: texts differ (random weights: a flat distribution)
    eos = client.completions.create(model="tiny_llama", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert eos.usage.completion_tokens == 40 and eos.choices[0].finish_reason == "length"


def test_64_concurrent_requests_share_the_batch(server):
    from openai import AsyncOpenAI

    server.engine.step_timings.clear()
    aclient = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one(i: int):
        kwargs = dict(model="tiny_llama", prompt=f"Request number {i}:", max_tokens=8, temperature=0,
                      extra_body={"ignore_eos": True})
        if i % 2:
            chunks = [c async for c in await aclient.completions.create(stream=True, **kwargs)]
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        out = await aclient.completions.create(**kwargs)
        return out.choices[0].text, out.choices[0].finish_reason

    async def all64():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    results = asyncio.run(all64())
    assert len(results) == 64 and all(reason == "length" for _, reason in results)
    # continuous batching: requests from different connections ran in the same steps, up to the batch size
    assert max(s.num_seqs for s in server.engine.step_timings) >= 8
    wait_idle(server)


def test_disconnect_mid_stream_frees_the_request(server):
    before = wait_idle(server)
    body = {"model": "tiny_llama", "prompt": "Hello", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()  # kept open: leaving a loop over it early would close the connection
        assert next(line for line in lines if line.startswith("data: "))
        assert metrics(server)["autodeploy:num_requests_running"] == 1
    # the client closed the connection after one chunk: the request is aborted, its KV pages freed
    after = wait_idle(server, timeout=10)
    assert after["autodeploy:kv_cache_usage_perc"] == 0.0
    assert after["autodeploy:generation_tokens_total"] - before["autodeploy:generation_tokens_total"] < 480


def test_disconnect_while_waiting_for_a_full_response(server):
    before = wait_idle(server)
    body = {"model": "tiny_llama", "prompt": "Hello", "max_tokens": 480, "ignore_eos": True}
    # 480 tokens take far longer than 0.1 s (each step is at least a forward and a sample on the host)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.1))
    after = wait_idle(server, timeout=10)
    assert after["autodeploy:kv_cache_usage_perc"] == 0.0
    assert after["autodeploy:generation_tokens_total"] - before["autodeploy:generation_tokens_total"] < 480


BAD_REQUESTS = [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokenz": 3}, 400, "max_tokenz"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"prompt": [5] * (MAX_SEQ_LEN + 10)}, 400, "prompt"),
    ({"prompt": [5] * 500, "max_tokens": 100}, 400, "max_tokens"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
]


@pytest.mark.parametrize("fields,status,param", BAD_REQUESTS, ids=[f"{p}-{s}-{i}" for i, (_, s, p) in enumerate(BAD_REQUESTS)])
def test_bad_completion_requests(server, fields, status, param):
    body = {"model": "tiny_llama", **fields}
    resp = httpx.post(f"{server.url}/v1/completions", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, None),  # content may be absent (null): the template gets ""
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, "functions"),
])
def test_bad_chat_requests(server, fields, param):
    resp = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny_llama", "max_tokens": 2, **fields})
    if param is None:
        assert resp.status_code == 200, resp.text
        return
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith(param)


def test_malformed_bodies_and_unknown_paths(server):
    resp = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]
    resp = httpx.post(f"{server.url}/v1/completions", json=[1, 2])  # pydantic's JSON parse fails: the old route's error
    assert resp.status_code == 400 and "must be a JSON object" in resp.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404


def test_the_client_library_raises_on_errors_and_the_server_still_serves(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny_llama", messages=[{"role": "user", "content": "x"}], temperature=-2)
    assert client.completions.create(model="tiny_llama", prompt="still here", max_tokens=2).usage.completion_tokens >= 1


def test_full_queue_gets_503(server, client):
    server.max_waiting_requests = 0  # no room: the next request is turned away
    try:
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny_llama", prompt="x", max_tokens=2)
        assert err.value.status_code == 503 and "max_waiting_requests" in str(err.value)
    finally:
        server.max_waiting_requests = 1024
    assert client.completions.create(model="tiny_llama", prompt="x", max_tokens=2).choices[0].text is not None


def test_api_key(server):
    server.api_key = "secret"
    try:
        body = {"model": "tiny_llama", "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 401
        assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics stay open
    finally:
        server.api_key = None


def test_sse_wire_format(server):
    body = {"model": "tiny_llama", "prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    for event in events[:-1]:
        data = json.loads(event.removeprefix("data: "))
        assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")


def test_completion_logprobs_streamed_and_not(client):
    kwargs = dict(model="tiny_llama", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3,
                  extra_body={"ignore_eos": True})
    lp = client.completions.create(**kwargs).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the sampled token is the likeliest
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs) if c.choices[0].logprobs]
    assert sum((c.tokens for c in chunks), []) == lp.tokens
    assert sum((c.text_offset for c in chunks), []) == lp.text_offset
    assert sum((c.token_logprobs for c in chunks), []) == pytest.approx(lp.token_logprobs)


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="tiny_llama", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_streamed_chunks_leave_at_once_on_a_kept_alive_connection(server):
    """TCP_NODELAY on the server's connections: without it a chunk written while the previous one
    waits for its ACK is held back (Nagle) until the client's delayed ACK, ~40 ms on Linux, which
    a kept-alive connection (the openai client's) hit at every first token."""
    import socket

    body = {"model": "tiny_llama", "prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.Client() as http:  # one connection, kept alive
        for _ in range(2):
            with http.stream("POST", f"{server.url}/v1/completions", json=body) as resp:
                lines = resp.iter_lines()
                next(lines)  # the response is open: its connection is the server's
                transports = [c.transport for c in server._http.server_state.connections]
                assert transports
                for t in transports:
                    assert t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                list(lines)
