"""Engine, scheduler and cache manager end to end on a fake paged model (fast, no real LM)."""

import pytest

from autodeploy.runtime.engine import Engine
from autodeploy.runtime.sampling_params import SamplingParams
from runtime_fakes import FakeTokenizer, PagedSumModel, expected_tokens, make_cache, prompts

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def engine(model=None, tokenizer=None, **cache_kw):
    return Engine(model or PagedSumModel(), make_cache(**cache_kw), tokenizer)


def test_greedy_batch_of_different_lengths_matches_reference():
    ps = prompts([3, 9, 1, 17])
    outs = engine().generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == [expected_tokens(p, 6) for p in ps]
    assert all(o.finish_reason == "length" and o.error is None for o in outs)
    assert [o.prompt_token_ids for o in outs] == ps


def test_new_prefills_join_running_decodes():
    model = PagedSumModel()
    eng = engine(model)
    first = eng.add_requests(prompts([5]), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    eng.step()  # prefill alone
    eng.step()  # decode alone
    late = eng.add_requests(prompts([6, 2], start=30), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eng.step()  # one forward: two prefills + one decode
    assert model.calls[-1] == (3, 6 + 2 + 1)
    while eng.has_unfinished_requests:
        eng.step()
    assert eng.output(first[0]).token_ids == expected_tokens(prompts([5])[0], 8)
    assert [eng.output(r).token_ids for r in late] == [expected_tokens(p, 3) for p in prompts([6, 2], start=30)]


def test_more_requests_than_max_batch_size_all_complete():
    model = PagedSumModel()
    ps = prompts([4, 7, 2, 9, 5, 3, 8, 6, 1, 10])
    outs = engine(model, max_batch_size=3).generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == [expected_tokens(p, 6) for p in ps]
    assert max(b for b, _ in model.calls) == 3


def test_chunked_prefill_within_max_num_tokens():
    model = PagedSumModel()
    ps = prompts([23, 5, 14])
    outs = engine(model, max_num_tokens=8).generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == [expected_tokens(p, 6) for p in ps]
    assert max(t for _, t in model.calls) <= 8


def test_page_exhaustion_preempts_and_completes_everything():
    # 9 usable pages of 4 tokens; four sequences of up to 24 tokens cannot all fit
    model = PagedSumModel()
    eng = engine(model, max_batch_size=4, max_seq_len=32, page_size=4, num_pages=10)
    ps = prompts([10, 12, 8, 11])
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = eng.generate(ps, sp)
    assert [o.token_ids for o in outs] == [expected_tokens(p, 12) for p in ps]
    assert eng.scheduler.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) == eng.scheduler.num_preemptions
    assert eng.cache.num_used_pages == 0 and eng.cache.num_free_slots == eng.cache.max_batch_size


def test_requests_wait_for_pages_without_preemption():
    eng = engine(max_batch_size=4, max_seq_len=32, page_size=4, num_pages=9)
    ps = prompts([16, 16, 16])  # each needs 4-5 pages: one at a time
    outs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert [o.token_ids for o in outs] == [expected_tokens(p, 2) for p in ps]


def test_max_seq_len_caps_generation():
    eng = engine(max_seq_len=12)
    outs = eng.generate(prompts([10, 12]), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    # every token fed to the model has a position < max_seq_len: prompt + generated <= max_seq_len + 1
    assert [len(o.token_ids) for o in outs] == [3, 1]
    assert all(o.finish_reason == "length" for o in outs)


def _changed_after_construction(**fields):
    """Construction refuses bad values; a field set afterwards still fails only its request."""
    params = SamplingParams()
    for name, value in fields.items():
        setattr(params, name, value)
    return params


def test_bad_inputs_fail_alone():
    eng = engine(tokenizer=FakeTokenizer(), max_seq_len=16)
    good = prompts([4])[0]
    cases = [
        (list(range(1, 20)), GREEDY, "max_seq_len"),
        ("", GREEDY, "empty prompt"),
        ([], GREEDY, "empty prompt"),
        (good, _changed_after_construction(temperature=-0.5), "temperature"),
        (good, _changed_after_construction(top_p=1.5), "top_p"),
        (good, _changed_after_construction(max_tokens=0), "max_tokens"),
        ([5, 1000], GREEDY, "out of range"),
        (12.5, GREEDY, "unsupported prompt"),
    ]
    batch = [good] + [c[0] for c in cases] + [good]
    params = [GREEDY] + [c[1] for c in cases] + [GREEDY]
    eng.vocab_size = 97
    outs = eng.generate(batch, params)
    assert len(outs) == len(batch)
    for o in (outs[0], outs[-1]):
        assert o.error is None and o.token_ids == expected_tokens(good, 6)
    for o, (_, _, msg) in zip(outs[1:-1], cases):
        assert o.finish_reason == "error" and msg in o.error and o.token_ids == []
    assert [o.request_id for o in outs] == sorted(o.request_id for o in outs)


def test_sampling_params_count_must_match():
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        engine().generate(prompts([1, 2, 3]), [GREEDY, GREEDY])


def test_forward_failure_fails_that_batch_only():
    model = PagedSumModel(fail_on_token=66)
    eng = engine(model)
    bad = eng.add_requests([[66, 3]], GREEDY)
    outs = eng.generate(prompts([4]), GREEDY)  # scheduled together with the bad one: both fail
    assert bad[0].finish_reason == "error" and "boom" in bad[0].error
    assert outs[0].finish_reason == "error"
    outs = eng.generate(prompts([4]), GREEDY)  # the engine goes on
    assert outs[0].token_ids == expected_tokens(prompts([4])[0], 6)
    assert eng.cache.num_used_pages == 0


def test_eos_stop_token_and_ignore_eos():
    p = prompts([5])[0]
    ref = expected_tokens(p, 6)
    eng = Engine(PagedSumModel(), make_cache(), eos_token_id=ref[2])
    out = eng.generate([p], SamplingParams(temperature=0, max_tokens=6))[0]
    assert out.token_ids == ref[:3] and out.finish_reason == "stop" and out.stop_reason == ref[2]
    out = eng.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == ref
    out = eng.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=[ref[1]]))[0]
    assert out.token_ids == ref[:2] and out.stop_reason == ref[1]


def test_stop_strings_cut_the_text():
    p = prompts([5])[0]
    ref = expected_tokens(p, 8)
    eng = engine(tokenizer=FakeTokenizer())
    stop = f"w{ref[3]}"
    out = eng.generate([p], SamplingParams(temperature=0, max_tokens=8, stop=[stop, "never"], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == ref[:4]
    assert out.text == " ".join(f"w{t}" for t in ref[:3]) + " "
    out = eng.generate([p], SamplingParams(temperature=0, max_tokens=8, stop=stop, include_stop_str_in_output=True, ignore_eos=True))[0]
    assert out.text.endswith(stop)


def test_text_and_chat_prompts():
    eng = engine(tokenizer=FakeTokenizer())
    text_out, chat_out, dict_out = eng.generate(
        ["w3 w4 w5", [{"role": "user", "content": "w3 w4"}], {"prompt_token_ids": [3, 4, 5]}], GREEDY
    )
    assert text_out.prompt_token_ids == [3, 4, 5] and text_out.token_ids == expected_tokens([3, 4, 5], 6)
    assert chat_out.prompt_token_ids == [3, 4, 1]
    assert dict_out.token_ids == text_out.token_ids
    assert text_out.text == " ".join(f"w{t}" for t in text_out.token_ids if t != 0)
    # a single prompt (string, token ids, one chat) is a batch of one
    assert len(eng.generate("w3 w4", GREEDY)) == 1
    assert len(eng.generate([3, 4], GREEDY)) == 1
    assert len(eng.generate([{"role": "user", "content": "w3"}], GREEDY)) == 1


def test_stream_yields_progress_and_final_outputs():
    eng = engine(tokenizer=FakeTokenizer())
    ps = prompts([3, 6])
    seen = {}
    for out in eng.stream(ps + [""], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)):
        prev = seen.get(out.request_id)
        assert prev is None or not prev.finished
        assert prev is None or out.token_ids[: len(prev.token_ids)] == prev.token_ids
        seen[out.request_id] = out
    finals = [seen[k] for k in sorted(seen)]
    assert [o.token_ids for o in finals[:2]] == [expected_tokens(p, 4) for p in ps]
    assert finals[2].finish_reason == "error"


def test_closing_a_stream_aborts_and_frees_pages():
    eng = engine()
    it = eng.stream(prompts([3, 6]), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    next(it)
    it.close()
    assert not eng.has_unfinished_requests and eng.cache.num_used_pages == 0


def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = PagedSumModel(sharpness=0.0)  # uniform logits: output is all randomness
    ps = prompts([3, 5, 2])
    sp = [SamplingParams(temperature=1.0, max_tokens=8, seed=s, ignore_eos=True) for s in (1, 2, 1)]
    outs = engine(model).generate(ps, sp)
    alone = engine(model).generate(ps[1:2], sp[1:2])
    again = engine(model).generate(ps, sp)
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]
    assert outs[1].token_ids == alone[0].token_ids
    assert outs[0].token_ids != outs[1].token_ids
    unseeded = engine(model).generate(ps[:1] * 2, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))
    assert unseeded[0].token_ids != unseeded[1].token_ids


def test_metrics_record_token_times():
    out = engine().generate(prompts([4]), GREEDY)[0]
    m = out.metrics
    assert len(m.token_times) == 6 and m.ttft is not None and m.ttft >= 0 and len(m.itl) == 5
    assert m.finished_time >= m.token_times[-1]


def test_stream_reports_progress_made_by_other_callers():
    eng = engine()
    it = eng.stream(prompts([3]), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    first = next(it)
    eng.generate(prompts([4]), SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))  # steps ours to the end
    rest = list(it)
    assert len(first.token_ids) == 1 and rest[-1].finished
    assert rest[-1].token_ids == expected_tokens(prompts([3])[0], 5)


def test_prefill_chunks_stay_small_while_others_decode():
    model = PagedSumModel()
    eng = Engine(model, make_cache(max_num_tokens=32), prefill_chunk_size=4)
    first = eng.add_requests(prompts([3]), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    eng.step()  # its prefill, alone
    late = eng.add_requests(prompts([13, 6], start=40), GREEDY)
    while eng.has_unfinished_requests:
        eng.step()
    # every later forward carries a decode, so at most 4 prompt tokens plus at most 2 decodes (all
    # three decoding means no prompt tokens); uncapped, the next step would take 1 + 13 + 6 tokens
    assert max(t for _, t in model.calls[1:]) <= 4 + 2
    assert eng.output(first[0]).token_ids == expected_tokens(prompts([3])[0], 10)
    assert [eng.output(r).token_ids for r in late] == [expected_tokens(p, 6) for p in prompts([13, 6], start=40)]


def test_step_timings_split_host_and_device_wait():
    eng = engine()
    eng.generate(prompts([4, 6]), GREEDY)
    timings = list(eng.step_timings)
    assert len(timings) == 6  # one prefill step, then five decode steps of both sequences
    assert [(t.num_seqs, t.num_tokens, t.is_decode) for t in timings[:2]] == [(2, 10, False), (2, 2, True)]
    assert all(t.host_s > 0 and t.wait_s >= 0 for t in timings)
