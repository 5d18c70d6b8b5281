"""Scheduler decisions on their own: budgets, decode priority, page pressure, preemption."""

from autodeploy.runtime.kv_cache import CacheInterface
from autodeploy.runtime.request import Request, Status
from autodeploy.runtime.sampling_params import SamplingParams
from autodeploy.runtime.scheduler import Scheduler

_ids = iter(range(10**6))


def request(prompt_len):
    return Request(next(_ids), None, [1] * prompt_len, prompt_len, SamplingParams(), seed=0)


def run(scheduler, batch, new_token=True):
    """Pretend the forward ran: cache the tokens; finished prompts get one new token."""
    for r, n in zip(batch.requests, batch.num_new_tokens):
        r.num_computed += n
        if new_token and not r.num_pending:
            r.token_ids.append(7)


def test_budget_chunks_prompts_and_keeps_prefills_first():
    s = Scheduler(CacheInterface(4, 64, max_num_tokens=10, page_size=4))
    a, b = request(7), request(9)
    s.add(a), s.add(b)
    batch = s.schedule()
    assert [(r, n) for r, n in zip(batch.requests, batch.num_new_tokens)] == [(a, 7), (b, 3)]
    run(s, batch)
    batch = s.schedule()  # a decodes, b continues its prompt: chunk first in the layout
    assert list(zip(batch.requests, batch.num_new_tokens)) == [(b, 6), (a, 1)]


def test_decodes_are_scheduled_before_an_older_prompt_chunk():
    s = Scheduler(CacheInterface(4, 64, max_num_tokens=8, page_size=4))
    old, young = request(40), request(3)
    s.add(old)
    run(s, s.schedule())  # old: first 8-token chunk
    s.add(young)
    s.running.append(s.waiting.popleft())  # young admitted and prefilled out of band
    young.status, young.slot, young.pages = Status.RUNNING, s.cache.allocate_slot(), s.cache.allocate_pages(1)
    young.num_computed = 3
    young.token_ids.append(7)
    batch = s.schedule()
    assert dict(zip(batch.requests, batch.num_new_tokens)) == {young: 1, old: 7}


def test_waiting_requests_wait_for_pages_first_come_first_served():
    cache = CacheInterface(4, 16, page_size=4)
    cache.resize(6)  # 5 usable pages
    s = Scheduler(cache)
    big, small = request(16), request(2)
    s.add(request(8)), s.add(big), s.add(small)
    batch = s.schedule()
    assert len(batch) == 1  # big does not fit; small must not jump the queue
    assert s.waiting[0] is big and s.waiting[1] is small


def test_preemption_takes_the_newest_and_requeues_it_first():
    cache = CacheInterface(4, 16, page_size=4)
    cache.resize(5)  # 4 usable pages
    s = Scheduler(cache)
    a, b = request(8), request(8)
    s.add(a), s.add(b)
    run(s, s.schedule())  # a and b hold 2 pages each, 9 tokens each now
    batch = s.schedule()  # both need a third page: b (newest) is preempted for a
    assert batch.requests == [a] and s.waiting[0] is b and b.num_computed == 0 and not b.pages
    assert b.metrics.num_preemptions == 1 and b.token_ids[-1] == 7  # its generated token is kept
    assert cache.num_free_pages == 1 and cache.num_free_slots == 3


def test_preempting_a_request_already_scheduled_this_step_unschedules_it():
    cache = CacheInterface(4, 12, page_size=4)
    cache.resize(4)  # 3 usable pages
    s = Scheduler(cache)
    a, b = request(12), request(3)
    for r, computed in ((a, 4), (b, 3)):  # a: mid-prompt; b: decoding
        r.status, r.slot, r.pages, r.num_computed = Status.RUNNING, cache.allocate_slot(), cache.allocate_pages(1), computed
        s.running.append(r)
    b.token_ids.append(7)
    batch = s.schedule()  # b's decode goes first, then a's chunk needs 2 more pages: b is preempted
    assert batch.requests == [a] and batch.num_new_tokens == [8]
    assert s.waiting[0] is b and b.status is Status.WAITING and len(a.pages) == 3


def test_prompt_tokens_are_capped_while_requests_decode():
    s = Scheduler(CacheInterface(4, 64, max_num_tokens=20, page_size=4), prefill_chunk_size=5)
    a, b, c = request(12), request(30), request(9)
    s.add(a)
    batch = s.schedule()  # nothing decodes yet: the whole budget
    assert batch.num_new_tokens == [12]
    run(s, batch)
    s.add(b), s.add(c)
    batch = s.schedule()  # a decodes: at most 5 prompt tokens in this step
    assert list(zip(batch.requests, batch.num_new_tokens)) == [(b, 5), (a, 1)]
    run(s, batch)
    batch = s.schedule()  # b's next chunk (5) leaves nothing for c, which waits
    assert list(zip(batch.requests, batch.num_new_tokens)) == [(b, 5), (a, 1)] and s.waiting[0] is c


def test_no_cap_without_prefill_chunk_size():
    s = Scheduler(CacheInterface(4, 64, max_num_tokens=20, page_size=4), prefill_chunk_size=None)
    a, b = request(12), request(30)
    s.add(a)
    run(s, s.schedule())
    s.add(b)
    batch = s.schedule()
    assert list(zip(batch.requests, batch.num_new_tokens)) == [(b, 19), (a, 1)]
