"""The server's pieces without a server: the logprobs mapping (on constructed outputs, in the engine's
logprobs API), the streamed text, request checks and `autodeploy serve`'s flags."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import pytest

from autodeploy.runtime import outputs
from autodeploy.serve.logprobs import chat_logprobs, completion_logprobs
from autodeploy.serve.protocol import ChatCompletionRequest, CompletionRequest, RequestError, validation_error
from autodeploy.serve.text import TextStream


@dataclass
class _Logprob:  # the engine's outputs.Logprob (logprob, rank, decoded_token), until it lands here
    logprob: float
    rank: Optional[int]
    decoded_token: Optional[str]


Logprob = getattr(outputs, "Logprob", _Logprob)
VOCAB = {1: "Hello", 2: " world", 3: "!", 4: " there", 5: "é"}


def decode(token_id: int) -> str:
    return VOCAB[token_id]


def steps():
    """Two generated tokens (2, then 3) with top-2 alternatives: the sampled token ranks 1, then 3."""
    return [
        {2: Logprob(-0.1, 1, " world"), 4: Logprob(-2.5, 2, " there")},
        {3: Logprob(-3.0, 3, None), 1: Logprob(-0.5, 1, "Hello"), 5: Logprob(-float("inf"), 2, "é")},
    ]


def test_completion_logprobs_legacy_shape():
    out, end = completion_logprobs([2, 3], steps(), k=2, decode=decode, text_offset=10)
    assert out["tokens"] == [" world", "!"]  # the decoded token, or the tokenizer's when the engine gave none
    assert out["token_logprobs"] == [-0.1, -3.0]
    # the top k by rank plus the sampled token (as vLLM); -inf as -9999.0 (JSON has no infinity)
    assert out["top_logprobs"] == [{" world": -0.1, " there": -2.5}, {"Hello": -0.5, "é": -9999.0, "!": -3.0}]
    assert out["text_offset"] == [10, 16] and end == 17
    # a stream continues the offsets from the previous chunk
    first, mid = completion_logprobs([2], steps()[:1], k=0, decode=decode)
    second, _ = completion_logprobs([3], steps()[1:], k=0, decode=decode, text_offset=mid)
    assert first["top_logprobs"] == [{" world": -0.1}] and second["text_offset"] == [6]


def test_chat_logprobs_shape():
    out = chat_logprobs([2, 3], steps(), k=2, decode=decode)
    first, second = out["content"]
    assert first == {"token": " world", "logprob": -0.1, "bytes": list(b" world"), "top_logprobs": [
        {"token": " world", "logprob": -0.1, "bytes": list(b" world")},
        {"token": " there", "logprob": -2.5, "bytes": list(b" there")}]}
    assert second["token"] == "!" and second["logprob"] == -3.0
    assert [t["token"] for t in second["top_logprobs"]] == ["Hello", "é"]  # the sampled one ranked 3rd: not in the top 2
    assert second["top_logprobs"][1]["bytes"] == list("é".encode()) and second["top_logprobs"][1]["logprob"] == -9999.0
    assert chat_logprobs([2], steps()[:1], k=0, decode=decode)["content"][0]["top_logprobs"] == []


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from autodeploy.models.tiny import ensure_tiny_model

    return AutoTokenizer.from_pretrained(ensure_tiny_model("tiny_llama"))


def test_text_stream_adds_up_to_the_decoded_text(tokenizer):
    ids = tokenizer.encode("Grüße aus Köln! naïve café, 東京 and emoji 🙂 done.", add_special_tokens=False)
    ids += list(range(3, 200, 7))  # and arbitrary ids: byte pieces that are not valid UTF-8 alone
    stream = TextStream(tokenizer)
    pieces = [stream.add([t]) for t in ids]
    final = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) + stream.finish(final) == final
    assert all("\ufffd" not in p for p in pieces[:10])  # a split character waits until it is whole


def test_text_stream_holds_back_a_possible_stop_string(tokenizer):
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["three"])
    released = ""
    for i, t in enumerate(ids):
        if "three" in tokenizer.decode(ids[: i + 1]):
            break  # the engine stops at this token: its last update carries the final text
        released += stream.add([t])
        assert "one two "[: len(released)] == released  # never a character that the stop string may take
    assert released + stream.finish("one two ") == "one two "


def test_request_checks_name_the_field():
    body = {"model": "m", "prompt": "x"}
    with pytest.raises(RequestError, match="n=2") as e:
        CompletionRequest.model_validate({**body, "n": 2}).check_supported()
    assert e.value.param == "n"
    with pytest.raises(RequestError) as e:
        CompletionRequest.model_validate({**body, "top_p": 2.0}).sampling_params(max_tokens=4, logprobs=None)
    assert e.value.param == "top_p" and e.value.status == 400
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as ve:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": 3}]})
    assert validation_error(ve.value.errors()).param.startswith("messages.0.content")
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "logprobs": True, "top_logprobs": 3, "store": False, "user": "u"})
    assert chat.requested_logprobs() == 3
    # unset sampling fields keep SamplingParams' defaults (OpenAI's: temperature 1, top_p 1)
    params = CompletionRequest.model_validate(body).sampling_params(max_tokens=4, logprobs=None)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (1.0, 1.0, None, 4)


def test_serve_subcommand_translates_to_overrides():
    from autodeploy.cli import serve_argv
    from autodeploy.config import compose_experiment

    argv = serve_argv(["tiny_llama", "--port", "0", "--host=0.0.0.0", "--api-key", "k y", "-tp", "2",
                       "--max-model-len", "256", "--args.max-batch-size=4", "server.shutdown_grace_s=2"])
    assert argv[:3] == ["server=openai", "--model", "tiny_llama"]
    cfg = compose_experiment(argv)
    assert (cfg.server.name, cfg.server.port, cfg.server.host, cfg.server.api_key) == ("openai", 0, "0.0.0.0", "k y")
    assert (cfg.args.world_size, cfg.args.max_seq_len, cfg.args.max_batch_size) == (2, 256, 4)
    assert cfg.server.shutdown_grace_s == 2 and cfg.model == "tiny_llama"


def test_progress_without_a_terminal_logs_counts_and_eta(caplog):
    import logging

    from autodeploy.bench.progress import Progress

    with caplog.at_level(logging.INFO, logger="autodeploy"):
        with Progress(4, "benchmark bs=8", every_s=0.0, tty=False) as p:
            for _ in range(4):
                p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("benchmark bs=8: 1/4 rounds") and "ETA" in lines[0]
    assert lines[-1].startswith("benchmark bs=8: 4/4 rounds") and "ETA" not in lines[-1]


def test_sse_json_has_no_character_a_line_splitter_breaks_at():
    from autodeploy.serve.app import _sse_json

    text = "a\u2028b\x85c\u2029d é 中\n"
    line = _sse_json({"text": text})
    assert len(f"data: {line}".splitlines()) == 1 and json.loads(line) == {"text": text}
    assert _sse_json("plain") == '"plain"'


def test_engine_updates_are_handed_on_before_the_engine_goes_on():
    """``EngineLoop._send``'s event is set once the event loop delivered the updates and the tasks
    they woke have run (the engine thread waits for it while the device has the next step)."""
    import asyncio
    import threading

    from autodeploy.serve.engine_loop import EngineLoop, Handle, Update

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    queue: asyncio.Queue = asyncio.Queue()
    seen: list[list[int]] = []

    async def reader(steps: int):
        for _ in range(steps * 3):
            seen.append((await queue.get()).new_token_ids)

    done = asyncio.run_coroutine_threadsafe(reader(3), loop)
    handles = [Handle([1, 2], None, i, queue.put_nowait, loop) for i in range(3)]
    try:
        for step in range(3):
            written = EngineLoop._send([(h, Update(h.index, [step])) for h in handles])
            assert written.wait(5) and seen[-3:] == [[step]] * 3  # the reader took all three already
        assert EngineLoop._send([]) is None
        done.result(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
