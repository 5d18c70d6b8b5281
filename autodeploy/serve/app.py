"""The HTTP endpoints (FastAPI): OpenAI's completions and chat completions, models, health, metrics.

A request is checked and tokenized here (a bad one gets OpenAI's error JSON: 400 naming the field,
404 for an unknown model, 503 when the queue is full or the server is stopping, 401 without the
API key), then handed to the engine thread (``EngineLoop``); its updates come back on this event
loop through a queue. A client that disconnects has its request aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .. import __version__
from ..runtime.prompts import tokenize
from .engine_loop import SHUTDOWN_MESSAGE, Handle, Update
from .logprobs import chat_logprobs, completion_logprobs
from .protocol import ChatCompletionRequest, CompletionRequest, RequestError, validation_error
from .text import TextStream

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("autodeploy.serve")

FINISH_REASONS = {"stop": "stop", "length": "length"}


def build_app(server: "Server") -> FastAPI:
    app = FastAPI(title="autodeploy", version=__version__, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, e: Exception) -> JSONResponse:  # a bug: this request fails, the server goes on
        log.exception("request failed")
        return JSONResponse(RequestError(f"internal error: {type(e).__name__}: {e}", 500).body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if server.loop.draining else 200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.authorize(request)
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.started, "owned_by": "autodeploy",
            "root": server.model_root, "max_model_len": server.max_seq_len,
        }]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.authorize(request)
        body = await _parse(request, CompletionRequest)
        server.check_model(body.model)
        body.check_supported()
        prompts = [_tokens(server, p, "prompt") for p in body.prompts()]
        return await _run(server, request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.authorize(request)
        body = await _parse(request, ChatCompletionRequest)
        server.check_model(body.model)
        body.check_supported()
        prompt = _tokens(server, [m.plain() for m in body.messages], "messages")
        return await _run(server, request, body, [prompt], chat=True)

    return app


async def _parse(request: Request, model: type) -> Any:
    body = await request.body()
    try:  # pydantic's own JSON parser: one pass, in TTFT (a 1024-id prompt: 76 us against 124 us, CPU)
        return model.model_validate_json(body)
    except ValidationError:
        pass  # a bad request: the error it gets is the one of the route below
    try:
        data = json.loads(body)
    except ValueError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def _tokens(server: "Server", prompt: Any, param: str) -> list[int]:
    try:
        ids = tokenize(prompt, server.tokenizer, server.vocab_size)
    except ValueError as e:
        raise RequestError(str(e), param=param) from None
    if len(ids) >= server.max_seq_len:
        raise RequestError(f"the prompt has {len(ids)} tokens: max_seq_len={server.max_seq_len} leaves no room to "
                           "generate", param=param)
    return ids


def _max_tokens(server: "Server", body: Union[CompletionRequest, ChatCompletionRequest], prompt_len: int) -> int:
    room = server.max_seq_len - prompt_len
    asked = body.requested_max_tokens() if isinstance(body, ChatCompletionRequest) else body.max_tokens
    if asked is None:
        return room
    if asked > room:
        name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        raise RequestError(f"{name}={asked} with a prompt of {prompt_len} tokens exceeds max_seq_len="
                           f"{server.max_seq_len}: at most {room}", param=name)
    return asked


async def _run(server: "Server", request: Request, body, prompts: list[list[int]], chat: bool):
    k = body.requested_logprobs() if chat else body.logprobs
    params = [body.sampling_params(_max_tokens(server, body, len(p)), k) for p in prompts]
    server.admit(len(prompts))
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[Update] = asyncio.Queue()
    handles = [Handle(ids, sp, i, updates.put_nowait, loop, snapshots=k is not None, stream=body.stream)
               for i, (ids, sp) in enumerate(zip(prompts, params))]
    server.loop.submit(handles)
    reply = _Reply(server, body, handles, chat, k)
    if body.stream:
        return StreamingResponse(reply.events(updates), media_type="text/event-stream")
    return await reply.collect(updates, request)


class _Reply:
    """One HTTP request's choices: their text streams, chunks and the final body."""

    def __init__(self, server: "Server", body, handles: list[Handle], chat: bool, logprobs: Optional[int]):
        self.server, self.body, self.handles, self.chat, self.k = server, body, handles, chat, logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = [TextStream(server.tokenizer, h.params.skip_special_tokens,
                                 None if h.params.include_stop_str_in_output else h.params.stop_strings)
                      for h in handles]
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (f'data: {{"id":"{self.id}","object":"{obj}","created":{self.created},'
                      f'"model":{json.dumps(server.model_name)},"choices":[')
        self.tokens = [0] * len(handles)  # generated so far, per choice
        self.offsets = [0] * len(handles)  # completions' text_offset so far, per choice

    def _decode(self, token_id: int) -> str:
        return self.server.tokenizer.decode([token_id]) if self.server.tokenizer is not None else ""

    def _logprobs(self, i: int, token_ids: list[int], output) -> Optional[dict]:
        if self.k is None or output is None:
            return None
        steps = (getattr(output, "logprobs", None) or [])[self.tokens[i]:self.tokens[i] + len(token_ids)]
        if self.chat:
            return chat_logprobs(token_ids, steps, self.k, self._decode)
        out, self.offsets[i] = completion_logprobs(token_ids, steps, self.k, self._decode, self.offsets[i])
        return out

    def _usage(self) -> dict:
        prompt = sum(len(h.prompt_ids) for h in self.handles)
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chunk(self, choices: str, usage: Optional[dict] = None) -> str:
        """One server-sent event; ``choices`` already JSON (the hot path writes it by hand)."""
        tail = f',"usage":{json.dumps(usage, separators=(",", ":"))}' if usage is not None else ""
        return f"{self._head}{choices}]{tail}}}\n\n"

    def _choice(self, i: int, u: Update) -> str:
        """Choice ``i``'s part of a chunk, for the updates that arrived since its last one."""
        out = u.output
        lp = self._logprobs(i, u.new_token_ids, out)
        first = self.tokens[i] == 0
        self.tokens[i] += len(u.new_token_ids)
        finish = None
        if u.finished:  # the engine's final text (stop strings cut) ends the stream
            text = self.texts[i].finish(out.text)
            finish = FINISH_REASONS[out.finish_reason]
        else:
            text = self.texts[i].add(u.new_token_ids)
        if lp is None and finish is None and not (self.chat and first):  # most chunks: no dict, one dumps
            body = f'"delta":{{"content":{_sse_json(text)}}}' if self.chat else f'"text":{_sse_json(text)}'
            return f'{{"index":{i},{body},"logprobs":null,"finish_reason":null}}'
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
        return _sse_json(choice)

    async def events(self, updates: asyncio.Queue) -> AsyncIterator[str]:
        """Server-sent events: a chunk per update of each choice, usage if asked, ``[DONE]``.
        Updates that queued up meanwhile (the event loop fell behind the engine) go out as one
        chunk per choice, so a busy server writes less instead of falling further behind."""
        left = len(self.handles)
        usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        try:
            while left:
                batch = {}
                u = await updates.get()
                while True:
                    seen = batch.get(u.index)
                    if seen is not None:  # merged: tokens appended, the latest output and state
                        u = Update(u.index, seen.new_token_ids + u.new_token_ids, u.output or seen.output, u.finished)
                    batch[u.index] = u
                    if updates.empty():
                        break
                    u = updates.get_nowait()
                for i, u in batch.items():
                    if u.finished:
                        left -= 1
                        if u.output.finish_reason not in FINISH_REASONS:  # failed, or aborted at shutdown
                            yield f"data: {json.dumps(_failure(u.output).body())}\n\n"
                            continue
                    yield self._chunk(self._choice(i, u))
            if usage:
                yield self._chunk("", self._usage())
            yield "data: [DONE]\n\n"
        finally:
            if left:  # the client went away (or the response failed): free its requests
                self.server.loop.abort(self.handles)

    async def collect(self, updates: asyncio.Queue, request: Request) -> Union[dict, Response]:
        """The whole response, or an error; a client that disconnects first aborts its requests."""
        outputs: list[Any] = [None] * len(self.handles)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            left = len(self.handles)
            while left:
                get = asyncio.ensure_future(updates.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    self.server.loop.abort(self.handles)
                    return Response(status_code=499)  # nobody reads it: the client is gone
                u = get.result()
                if u.finished:
                    outputs[u.index] = u.output
                    left -= 1
        finally:
            gone.cancel()
        for out in outputs:
            if out.finish_reason not in FINISH_REASONS:
                raise _failure(out)
        choices = []
        for i, out in enumerate(outputs):
            lp = self._logprobs(i, list(out.token_ids), out)
            self.tokens[i] = len(out.token_ids)
            reason = FINISH_REASONS[out.finish_reason]
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": out.text}, "logprobs": lp,
                                "finish_reason": reason})
            else:
                choices.append({"index": i, "text": out.text, "logprobs": lp, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.server.model_name, "choices": choices, "usage": self._usage()}


# characters that Python's str.splitlines (so httpx's aiter_lines) ends a line at, and JSON keeps as they are
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _sse_json(obj: Any) -> str:
    """Compact JSON for an SSE data line: non-ASCII text as is, but no character that a
    line-splitting client would break the line at."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return s if s.isascii() else s.translate(_LINE_BREAKS)


def _failure(out) -> RequestError:
    if out.finish_reason == "aborted" or out.error == SHUTDOWN_MESSAGE:
        return RequestError(f"{SHUTDOWN_MESSAGE}: the request was aborted", 503)
    message = out.error or "the request failed"
    if message.startswith("invalid request: "):  # the engine rejected it on arrival
        return RequestError(message.removeprefix("invalid request: "), 400)
    return RequestError(message, 500)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
