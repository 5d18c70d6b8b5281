"""End to end on the tiny models (CPU, torch backend): HF parity, batching, pages, bad input."""

import pytest

from autodeploy.runtime.sampling_params import SamplingParams

# different lengths; the 13-token prompt spans two pages of 8
PROMPTS = [[1, 5, 9, 22, 41, 7], [1] + [100] * 12, [1, 3], [1, 17, 18, 19, 20, 21, 22, 23, 24, 25]]
GREEDY = SamplingParams(temperature=0, max_tokens=10)


def test_greedy_matches_hf_generate(tiny_model):
    outs = tiny_model.engine().generate(PROMPTS, GREEDY)
    assert [o.error for o in outs] == [None] * len(PROMPTS)
    assert [o.token_ids for o in outs] == [tiny_model.hf_greedy(p, 10) for p in PROMPTS]


def test_mixed_prefill_decode_batch_equals_each_alone(tiny_model):
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = [tiny_model.engine().generate([p], sp)[0].token_ids for p in PROMPTS]
    # a small token budget chunks the long prompts; later requests' prefills join running decodes
    engine = tiny_model.engine(max_num_tokens=7)
    first = engine.add_requests(PROMPTS[:2], sp)
    for _ in range(3):
        engine.step()
    late = engine.add_requests(PROMPTS[2:], sp)
    while engine.has_unfinished_requests:
        engine.step()
    assert [engine.output(r).token_ids for r in first + late] == alone


def test_more_requests_than_max_batch_size(tiny_llama):
    prompts = [[1] + [10 + i] * (2 + i) for i in range(11)]
    engine = tiny_llama.engine(max_batch_size=3)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == [tiny_llama.hf_greedy(p, 6, ignore_eos=True) for p in prompts]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_hybrid"])
def test_page_exhaustion_preempts_and_completes(name, request):
    model = request.getfixturevalue(name)
    engine = model.engine(max_batch_size=4, max_seq_len=48)
    engine.cache.resize(engine.cache.pages_per_seq + 4)  # 10 pages of 8: not enough for 4 x ~30 tokens
    prompts = [[1] + [30 + i] * (8 + 3 * i) for i in range(4)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [model.hf_greedy(p, 14, ignore_eos=True) for p in prompts]
    assert engine.cache.num_used_pages == 0


def test_bad_inputs_fail_alone_and_the_rest_completes(tiny_llama):
    engine = tiny_llama.engine()
    good = "The quick brown fox"
    too_long = " ".join(["word"] * 200)
    changed = SamplingParams()
    changed.top_p = 1.01  # construction refuses it; set afterwards, it fails only this request
    batch = [good, too_long, "", good, [], good]
    params = [GREEDY, GREEDY, GREEDY, changed, GREEDY, GREEDY]
    outs = engine.generate(batch, params)
    expected_errors = [None, "max_seq_len=96", "empty prompt", "top_p", "empty prompt", None]
    for out, err in zip(outs, expected_errors):
        if err is None:
            assert out.error is None and out.finish_reason in ("stop", "length") and out.token_ids
        else:
            assert out.finish_reason == "error" and err in out.error and out.token_ids == []
    assert outs[0].token_ids == outs[-1].token_ids
    assert [o.prompt for o in outs] == batch


def test_text_chat_and_outputs(tiny_llama):
    engine = tiny_llama.engine()
    tok = tiny_llama.tokenizer
    messages = [{"role": "user", "content": "Name three colors."}]
    text_out, chat_out = engine.generate(["Hello there", messages], GREEDY)
    assert text_out.prompt_token_ids == tok("Hello there").input_ids
    assert text_out.text == tok.decode(text_out.token_ids, skip_special_tokens=True)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_out.prompt_token_ids == tok(rendered, add_special_tokens=False).input_ids
    assert chat_out.token_ids == tiny_llama.hf_greedy(chat_out.prompt_token_ids, 10)


def test_stop_string_ends_generation(tiny_llama):
    engine = tiny_llama.engine()
    free = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip()
    out = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.find(stop)]
    assert free.token_ids[: len(out.token_ids)] == out.token_ids


def test_seeded_sampling_reproducible_across_batches(tiny_hybrid):
    engine = tiny_hybrid.engine()
    sp = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, max_tokens=8, seed=1234, ignore_eos=True)
    together = engine.generate(PROMPTS, [sp, GREEDY, sp, GREEDY])
    alone = engine.generate([PROMPTS[2]], sp)[0]
    assert together[2].token_ids == alone.token_ids
    again = engine.generate([PROMPTS[0]], sp)[0]
    assert again.token_ids == together[0].token_ids
    assert together[1].token_ids == tiny_hybrid.hf_greedy(PROMPTS[1], 10)


def test_stream_ends_with_the_generate_result(tiny_llama):
    engine = tiny_llama.engine()
    finals = {}
    for out in engine.stream(PROMPTS[:2], GREEDY):
        if out.finished:
            finals[out.request_id] = out
    streamed = [finals[k].token_ids for k in sorted(finals)]
    assert streamed == [o.token_ids for o in engine.generate(PROMPTS[:2], GREEDY)]
