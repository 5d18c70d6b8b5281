"""The overlap scheduler: a step is launched before the previous one lands, its last tokens fed
from the device. Same outputs as the synchronous engine in every scenario, and really ahead."""

import pytest

from autodeploy.runtime.engine import Engine
from autodeploy.runtime.sampling_params import SamplingParams
from runtime_fakes import FakeTokenizer, PagedSumModel, expected_tokens, make_cache, prompts


SCENARIOS = {
    "mixed_lengths": (dict(), prompts([3, 9, 1, 17]), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
    "more_than_max_batch": (dict(max_batch_size=3), prompts([4, 7, 2, 9, 5, 3, 8, 6, 1, 10]),
                            SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)),
    "chunked_prefill": (dict(max_num_tokens=8), prompts([23, 5, 14]),
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
    "preemption": (dict(max_batch_size=4, max_seq_len=32, page_size=4, num_pages=10), prompts([10, 12, 8, 11]),
                   SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
    "max_seq_len": (dict(max_seq_len=12), prompts([10, 12, 5]),
                    SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)),
    "seeded_sampling": (dict(), prompts([3, 5, 2]),
                        [SamplingParams(temperature=1.0, max_tokens=8, seed=s, ignore_eos=True) for s in (1, 2, 3)]),
    "stop_strings": (dict(), prompts([5, 6]), SamplingParams(temperature=0, max_tokens=8, stop=["w50", "w7"])),
}


def _run(overlap, cache_kw, ps, sp, sharpness=10.0, eos=None):
    model = PagedSumModel(sharpness=sharpness)
    eng = Engine(model, make_cache(**cache_kw), FakeTokenizer(), eos_token_id=eos, overlap=overlap)
    outs = eng.generate(ps, sp)
    assert eng.cache.num_used_pages == 0 and eng.cache.num_free_slots == eng.cache.max_batch_size
    assert eng._in_flight is None
    return [(o.token_ids, o.finish_reason, o.stop_reason, o.text) for o in outs], model.calls, eng


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_overlap_gives_the_synchronous_outputs(name):
    cache_kw, ps, sp = SCENARIOS[name]
    sharpness = 0.0 if name == "seeded_sampling" else 10.0  # uniform logits: the draws alone decide
    sync, _, _ = _run(False, cache_kw, ps, sp, sharpness)
    ahead, _, eng = _run(True, cache_kw, ps, sp, sharpness)
    assert ahead == sync
    if name == "preemption":
        assert eng.scheduler.num_preemptions > 0
    if name not in ("seeded_sampling", "stop_strings"):  # their tokens are not the greedy sums
        params = sp if isinstance(sp, SamplingParams) else sp[0]
        for (tokens, *_), p in zip(ahead, ps):
            n = len(tokens) if name == "max_seq_len" else params.max_tokens
            assert tokens == expected_tokens(p, n)


def test_eos_costs_one_wasted_row_and_nothing_else():
    p = prompts([5])[0]
    ref = expected_tokens(p, 6)
    sp = SamplingParams(temperature=0, max_tokens=6)
    sync, sync_calls, _ = _run(False, {}, [p], sp, eos=ref[2])
    ahead, ahead_calls, _ = _run(True, {}, [p], sp, eos=ref[2])
    assert ahead == sync and ahead[0][0] == ref[:3] and ahead[0][1] == "stop"
    # the step after the EOS token was launched before it landed: one forward more, its token dropped
    assert len(ahead_calls) == len(sync_calls) + 1


def test_length_limits_waste_no_step():
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    _, sync_calls, _ = _run(False, {}, prompts([4, 6]), sp)
    _, ahead_calls, _ = _run(True, {}, prompts([4, 6]), sp)
    assert ahead_calls == sync_calls == [(2, 10)] + [(2, 2)] * 5


def test_each_step_launches_before_the_previous_lands():
    model = PagedSumModel()
    eng = Engine(model, make_cache(), overlap=True)
    p = prompts([5])[0]
    (r,) = eng.add_requests([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert eng.step() == [] and r.num_inflight == 1 and r.output_token_ids == []  # prefill launched
    # the decode is launched with the first token still on the device, then the prefill lands
    assert eng.step() == [r] and r.output_token_ids == expected_tokens(p, 1) and r.num_inflight == 1
    assert model.calls == [(1, 5), (1, 1)]
    eng.step()
    eng.step()  # the 4th token is launched; nothing more is scheduled once it lands
    assert r.num_inflight == 1 and not r.finished
    assert eng.step() == [r] and r.finished and r.output_token_ids == expected_tokens(p, 4)
    assert len(model.calls) == 4 and [s.num_tokens for s in eng.step_timings] == [5, 1, 1, 1]


def test_aborted_request_drops_its_in_flight_token():
    eng = Engine(PagedSumModel(), make_cache(), overlap=True)
    it = eng.stream(prompts([3, 6]), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    first = next(it)
    assert len(first.token_ids) == 1
    it.close()  # both requests aborted while a step is in flight; that step still lands, quietly
    assert not eng.has_unfinished_requests and eng._in_flight is None and eng.cache.num_used_pages == 0
    out = eng.generate(prompts([4]), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert out.token_ids == expected_tokens(prompts([4])[0], 3)
