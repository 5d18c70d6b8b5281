"""The continuous-batching engine: requests in, ``RequestOutput`` out.

One step = schedule -> build the flattened batch -> forward -> sample (launched: a "flight") ->
land (the sampled ids reach the host: append, stop checks, release). Requests that ask for
logprobs get them from the same logits, computed with the flight and landed with its ids
(``logprobs.py``). The only host sync per step is reading the sampled ids. With ``overlap`` (the
overlap scheduler; default on CUDA) a step launches its flight before it lands the previous one,
so the device never waits for the host:
a token still on the device is fed to the next step by a device-side copy into its inputs
(``Request.num_inflight``), requests that its landing ends by length are not scheduled again,
and a request that a landed token stops (EOS, stop string) wastes one row of the flight already
launched, whose token is dropped. Each flight's host time (everything but the wait for its ids)
is kept in ``step_timings``. Every request ends with a result or an error:
bad input fails at arrival (other requests go on), a failing forward fails the requests of that
batch, an abandoned stream aborts its requests and frees their pages.

``Engine(model, cache, tokenizer)`` takes the built model (the cached graph: flattened inputs,
metadata and cache tensors, see docs/architecture.md) and the ``CacheInterface`` it was built with
(caches allocated).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import fx, nn

from .kv_cache import CacheInterface
from .logprobs import StepLogprobs, token_decoder
from .outputs import RequestOutput, StepTiming
from .prompts import as_prompt_list, tokenize
from .request import Request
from .sampler import Sampler, SamplingBatch, _to_device, fold_seed
from .sampling_params import SamplingParams
from .scheduler import DEFAULT_PREFILL_CHUNK_SIZE, ScheduledBatch, Scheduler
from .stopping import StopChecker

log = logging.getLogger(__name__)

SamplingArg = Union[SamplingParams, Sequence[SamplingParams], None]


@dataclass
class Flight:
    """A launched step whose sampled ids have not landed on the host yet."""

    batch: ScheduledBatch
    rows: dict[Request, int]  # requests that get a token from this step -> their row of `sampled`
    sampled: torch.Tensor  # [B] on the device
    landed: torch.Tensor  # [B] on the host (pinned), valid once `ready` has passed
    ready: Optional[torch.cuda.Event]
    host_s: float  # host time spent on it so far
    logprobs: Optional[StepLogprobs] = None  # requests that asked for logprobs: their rows' results


class Engine:
    def __init__(
        self,
        model: nn.Module,
        cache: CacheInterface,
        tokenizer: Optional[Any] = None,
        *,
        eos_token_id: Union[int, Iterable[int], None] = None,
        vocab_size: Optional[int] = None,
        ranks: Optional[Any] = None,
        prefill_chunk_size: Optional[int] = DEFAULT_PREFILL_CHUNK_SIZE,
        overlap: Optional[bool] = None,
    ):
        self.model = model
        # multi-rank runs: rank 0's handle on the other ranks (distributed/ranks.py), which get every step
        self.ranks = ranks
        self.cache = cache
        if cache.specs and not cache.tensors:
            cache.initialize()  # the pipeline had no initialize_cache / resize_kv_cache
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(cache, prefill_chunk_size)
        self.sampler = Sampler()
        self.vocab_size = vocab_size  # the factory states it (build_engine); None: ids are not range-checked
        self.stop_checker = StopChecker(_eos_ids(eos_token_id, tokenizer), cache.max_seq_len, tokenizer)
        self._decode_token = token_decoder(tokenizer)  # Logprob.decoded_token
        self._input_names = _graph_input_names(model)
        self._next_request_id = 0
        # None = on with a CUDA device; on the CPU the forward runs on the host, so nothing would
        # overlap, and a landed token would wait for the next step's forward
        self.overlap = cache.device.type == "cuda" if overlap is None else overlap
        self._in_flight: Optional[Flight] = None  # overlap: the launched step not landed yet
        # host time and device wait of the latest steps (the benchmark reads and clears it)
        self.step_timings: deque[StepTiming] = deque(maxlen=100_000)

    # ---- public API ----

    def generate(self, prompts: Any, sampling_params: SamplingArg = None, progress: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` to completion; one output per prompt, in order."""
        requests = self.add_requests(prompts, sampling_params)
        bar = _progress_bar(len(requests), progress)
        try:
            while not all(r.finished for r in requests):
                self.step()
                bar.update(sum(r.finished for r in requests) - bar.n)
        finally:
            self.abort(requests)
            self._settle()
            bar.close()
        return [self.output(r) for r in requests]

    def stream(self, prompts: Any, sampling_params: SamplingArg = None) -> Iterator[RequestOutput]:
        """Yield a request's output (text and token_ids so far) whenever it gets tokens or ends.

        The last output of each request has ``finished == True``. Closing the iterator early
        aborts the requests it still runs.
        """
        requests = self.add_requests(prompts, sampling_params)
        reported = [(0, False)] * len(requests)  # (tokens, finished) last yielded per request
        try:
            while True:
                for i, r in enumerate(requests):
                    state = (r.num_generated, r.finished)
                    if state != reported[i] and (r.num_generated or r.finished):
                        reported[i] = state
                        yield self.output(r)
                if all(finished for _, finished in reported):
                    return
                if not all(r.finished for r in requests):
                    self.step()  # also advances other callers' requests; we report only ours
        finally:
            self.abort(requests)
            self._settle()

    def add_requests(self, prompts: Any, sampling_params: SamplingArg = None) -> list[Request]:
        prompts = as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        return [self.add_request(p, sp) for p, sp in zip(prompts, params)]

    def add_request(self, prompt: Any, params: Optional[SamplingParams] = None) -> Request:
        """Queue one request. Invalid input gives a request that is already finished with an error."""
        params = params or SamplingParams()
        request = Request(self._next_request_id, prompt, [], 0, params, seed=0)
        self._next_request_id += 1
        try:
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
            params.check()
            request.token_ids = tokenize(prompt, self.tokenizer, self.vocab_size)
            request.prompt_len = len(request.token_ids)
            if request.prompt_len > self.cache.max_seq_len:
                raise ValueError(
                    f"prompt has {request.prompt_len} tokens, more than max_seq_len={self.cache.max_seq_len}"
                )
            if params.logprobs is not None:
                request.logprobs = []
            if params.prompt_logprobs is not None:
                request.prompt_logprobs = [None]  # nothing predicts the first prompt token
        except Exception as e:  # noqa: BLE001 - bad input (or a tokenizer error) fails this request only
            self._fail(request, f"invalid request: {e}")
            return request
        request.seed = fold_seed(params.seed) if params.seed is not None else int(torch.randint(2**32, ()))
        self.scheduler.add(request)
        return request

    def abort(self, requests: Iterable[Request]) -> None:
        for r in requests:
            if not r.finished:
                self.scheduler.release(r)
                r.finish_reason = "aborted"
                r.text = self.stop_checker.detokenize(r)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    # ---- one step ----

    def step(self) -> list[Request]:
        """Launch one forward over the scheduled batch and land the previous one (overlap) or this
        one; returns the requests that got a token or ended."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            if self._in_flight is None:
                return self._fail_unschedulable()
            return self._land_in_flight()  # what is left runs on the device
        for r in batch.requests:
            if r.metrics.first_scheduled_time is None:
                r.metrics.first_scheduled_time = start
        try:
            flight = self._launch(batch, start)
        except Exception as e:  # noqa: BLE001 - the batch's requests get the error, the engine goes on
            failure = self.ranks.failure(e) if self.ranks is not None else None
            if failure is not None:
                raise failure from e  # another rank is gone: the run cannot go on
            log.exception("forward failed for requests %s", [r.request_id for r in batch.requests])
            updated = self._land_in_flight()
            for r in batch.requests:
                if not r.finished:
                    self._fail(r, f"generation failed: {type(e).__name__}: {e}")
            return updated + [r for r in batch.requests if r not in updated]
        if not self.overlap:
            return self._land(flight)
        updated = self._land_in_flight()
        self._in_flight = flight
        return updated

    def _launch(self, batch: ScheduledBatch, start: float) -> Flight:
        """Forward and sampling of ``batch`` on the device, the ids' copy to the host started."""
        with self.ranks.busy() if self.ranks is not None else contextlib.nullcontext():
            sampled, logprobs = self._forward_and_sample(batch)
        if sampled.is_cuda:
            landed = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            landed.copy_(sampled, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            landed, ready = sampled, None
        rows = {}
        for i, (r, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            r.num_computed += n
            if not r.num_pending:  # its prompt is done (or it decoded): a token is on its way
                r.num_inflight += 1
                rows[r] = i
        return Flight(batch, rows, sampled, landed, ready, host_s=time.perf_counter() - start, logprobs=logprobs)

    def _land_in_flight(self) -> list[Request]:
        flight, self._in_flight = self._in_flight, None
        return self._land(flight) if flight is not None else []

    def _settle(self) -> None:
        """Land a flight nobody waits for (its requests all ended), so that no work stays behind."""
        if self._in_flight is not None and not self.scheduler.has_work:
            self._land_in_flight()

    def _land(self, flight: Flight) -> list[Request]:
        """Wait for the flight's ids; append them, check stops, release finished requests."""
        t0 = time.perf_counter()
        try:
            if flight.ready is not None:
                with self.ranks.busy() if self.ranks is not None else contextlib.nullcontext():
                    flight.ready.synchronize()  # the step's one host sync
            tokens = flight.landed.tolist()
        except Exception as e:  # noqa: BLE001 - an error the device reported late
            failure = self.ranks.failure(e) if self.ranks is not None else None
            if failure is not None:
                raise failure from e
            log.exception("forward failed for requests %s", [r.request_id for r in flight.batch.requests])
            for r in flight.batch.requests:
                r.num_inflight -= r in flight.rows
                if not r.finished:
                    self._fail(r, f"generation failed: {type(e).__name__}: {e}")
            return list(flight.batch.requests)
        synced = now = time.perf_counter()
        logprobs = flight.logprobs
        dicts = logprobs.land(self._decode_token) if logprobs else None  # prompt logprobs appended
        updated = []
        for request, row in flight.rows.items():
            request.num_inflight -= 1
            if request.finished:  # stopped, aborted or failed while this step ran: its token is dropped
                continue
            request.token_ids.append(tokens[row])
            if dicts is not None and request in logprobs.sampled:
                request.logprobs.append(dicts(logprobs.sampled[request][1], tokens[row], request.params.logprobs))
            request.metrics.token_times.append(now)
            self.stop_checker(request)
            if request.finish_reason:
                request.metrics.finished_time = now
                self.scheduler.release(request)
            updated.append(request)
        batch = flight.batch
        self.step_timings.append(StepTiming(
            len(batch), sum(batch.num_new_tokens), host_s=flight.host_s + (time.perf_counter() - synced),
            wait_s=synced - t0,
        ))
        return updated

    def _forward_and_sample(self, batch: ScheduledBatch) -> tuple[torch.Tensor, Optional[StepLogprobs]]:
        """Launch the step's forward and sampling; returns the sampled ids [B] on the device, and the
        logprobs of the requests that ask for them (launched, their copy to the host started)."""
        tokens, patch_at, patch_from = [], [], []
        offset = 0
        for r, n in zip(batch.requests, batch.num_new_tokens):
            chunk = r.token_ids[r.num_computed: r.num_computed + n]
            if len(chunk) < n:  # its last token is still on the device, in the flight before this one
                if len(chunk) != n - 1 or self._in_flight is None or r not in self._in_flight.rows:
                    raise RuntimeError(f"request {r.request_id}: {n - len(chunk)} tokens in flight, expected 1")
                patch_at.append(offset + n - 1)
                patch_from.append(self._in_flight.rows[r])
                chunk = chunk + [0]
            tokens.append(chunk)
            offset += n
        logprobs = full = None
        if any(r.logprobs is not None or r.prompt_logprobs is not None for r in batch.requests):
            full = [r.wants_prompt_logits for r in batch.requests]  # prompt logprobs: every token's logits
            logprobs = StepLogprobs(batch.requests, batch.num_new_tokens, full)
        inputs = self.cache.info.build(
            tokens=tokens,
            input_pos=[r.num_computed for r in batch.requests],
            pages=[r.pages for r in batch.requests],
            slots=[r.slot for r in batch.requests],
            full_logits=full,
        )
        if patch_at:
            _copy_rows(inputs.named_args["input_ids"].view(-1), patch_at, self._in_flight.sampled, patch_from)
        if self.ranks is not None:
            self.ranks.send(self.cache.info, inputs.num_seqs, inputs.num_tokens, inputs.num_logits)
        with torch.inference_mode():
            logits = self.forward(inputs)[0]
            if logits.shape[0] != inputs.num_logits:  # every token's logits (no gather_last_token_logits)
                logits = logits[inputs.logits_idx]  # [G, V]
            last = logits  # [B, V]: each sequence's last token
            if inputs.num_logits != inputs.num_seqs:
                last = logits.index_select(0, _to_device(logprobs.last_rows, torch.int64, logits.device))
            sampling = SamplingBatch.from_params(
                [r.params for r in batch.requests], [r.seed for r in batch.requests],
                [r.num_generated + r.num_inflight for r in batch.requests],  # index of the token drawn
            )
            sampled = self.sampler(last, sampling)
            if logprobs:
                logprobs.compute(logits, sampled)  # the same logits the sampler got
            return sampled, logprobs or None

    def forward(self, inputs) -> torch.Tensor:
        """The model on one step's inputs (``SequenceInfo`` views): logits ``[1, T, V]``, or
        ``[1, G, V]`` (the rows of ``logits_idx``) from a graph that gathers them."""
        args = {**inputs.named_args, **self.cache.tensors}
        if self._input_names is not None:
            args = {k: args[k] for k in self._input_names if k in args}
        with torch.inference_mode():
            return _logits(self.model(**args))

    # ---- failures and outputs ----

    def _fail(self, request: Request, message: str) -> None:
        self.scheduler.release(request)
        request.finish_reason, request.error = "error", message
        request.metrics.finished_time = time.perf_counter()
        request.text = self.stop_checker.detokenize(request) if request.prompt_len else ""

    def _fail_unschedulable(self) -> list[Request]:
        # cannot happen while the cache holds one max_seq_len sequence; never spin forever
        stuck = list(self.scheduler.waiting) + list(self.scheduler.running)
        for r in stuck:
            self._fail(r, f"could not be scheduled (KV cache: {self.cache})")
        return stuck

    def output(self, request: Request) -> RequestOutput:
        text = request.text if request.text is not None else self.stop_checker.detokenize(request)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.token_ids[: request.prompt_len],
            text=text,
            token_ids=request.output_token_ids,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            error=request.error,
            metrics=request.metrics,
            # copies: a streamed snapshot keeps what it had
            logprobs=list(request.logprobs) if request.logprobs is not None else None,
            prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
        )


def _copy_rows(dst: torch.Tensor, dst_rows: list[int], src: torch.Tensor, src_rows: list[int]) -> None:
    """``dst[dst_rows] = src[src_rows]`` on the device, without a host sync."""
    k = len(dst_rows)
    if dst_rows == src_rows == list(range(k)):  # steady decode: the same requests in the same order
        dst[:k].copy_(src[:k])
        return
    index = torch.tensor([dst_rows, src_rows], dtype=torch.int64)
    if dst.is_cuda:
        index = index.pin_memory().to(dst.device, non_blocking=True)
    dst.index_copy_(0, index[0], src.index_select(0, index[1]))


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI), so the output stays readable
    return tqdm(total=total, desc="generate", unit="req", disable=None if enabled and total > 1 else True)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits


def _eos_ids(eos_token_id: Union[int, Iterable[int], None], tokenizer: Optional[Any]) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def _graph_input_names(model: nn.Module) -> Optional[list[str]]:
    """The inputs the model takes, of those a step offers (a graph that does not gather its logits
    takes no ``logits_idx``): a plain GraphModule's placeholders, or the named parameters of a
    ``forward`` without ``**kwargs``; None (pass everything) for one that takes any keyword
    (the compiled wrappers ignore what the graph does not take)."""
    if isinstance(model, fx.GraphModule):
        return [n.target for n in model.graph.nodes if n.op == "placeholder"]
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params]
