"""Logprobs (``SamplingParams.logprobs`` / ``prompt_logprobs``) as vLLM reports them: HF's
``log_softmax`` of the same model's logits (tiny models, fp32, within 1e-4), raw (before
temperature), every prompt position across prefill chunks, the rest of a batch untouched, in
streamed snapshots; and exactly on a fake model whose logits are known in closed form, with the
overlap scheduler, preemption and a graph that returns every token's logits."""

import math

import pytest
import torch

from autodeploy.runtime.engine import Engine
from autodeploy.runtime.sampling_params import SamplingParams
from runtime_fakes import VOCAB, FakeTokenizer, PagedSumModel, expected_tokens, make_cache, next_token, prompts

TOL = 1e-4
# lengths around the thresholds: one token, a page of 8 (and more), MoE's dense/grouped switch at 64
PROMPT_LENGTHS = [1, 9, 23, 70]


def _prompts(vocab, lengths=PROMPT_LENGTHS, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is the distribution of the token after ids[i]."""
    return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_position(entry, token, ref, k, decode=None):
    """One position's dict against the reference distribution ``ref [V]``."""
    assert token in entry and len(entry) in (k, k + 1), (entry, token, k)
    assert list(entry)[0] == token  # the chosen token first, then the top-k in rank order
    for t, lp in entry.items():
        assert abs(lp.logprob - ref[t].item()) < TOL, (t, lp.logprob, ref[t].item())
        if decode is not None:
            assert lp.decoded_token == decode(t)
    # rank: 1 + the tokens with a larger logprob (ties within the tolerance either way)
    chosen = ref[token].item()
    rank = entry[token].rank
    assert int((ref > chosen + TOL).sum()) + 1 <= rank <= int((ref > chosen - TOL).sum()) + 1
    # the others are the top k (with the chosen token, if it is one of them), in rank order
    others = [lp for t, lp in entry.items() if t != token]
    ranks = [lp.rank for lp in others]
    assert ranks == sorted(ranks)
    assert sorted(ranks + ([rank] if len(entry) == k else [])) == list(range(1, k + 1))
    top = ref.topk(k).values if k else []
    for lp in others:
        assert abs(lp.logprob - top[lp.rank - 1].item()) < TOL


def check_output(out, hf, k, kp, decode=None):
    """Every generated token's and prompt token's logprobs against HF on prompt + output."""
    ref = hf_logprobs(hf, out.prompt_token_ids + out.token_ids)
    n = len(out.prompt_token_ids)
    assert len(out.logprobs) == len(out.token_ids)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        check_position(entry, token, ref[n - 1 + i], k, decode)
    assert len(out.prompt_logprobs) == n and out.prompt_logprobs[0] is None
    for i in range(1, n):
        check_position(out.prompt_logprobs[i], out.prompt_token_ids[i], ref[i - 1], kp, decode)


def test_logprobs_equal_hf_log_softmax(tiny_model):
    """One batch: prompts of 1..70 tokens asking for both kinds, one asking for neither (its tokens
    and the others' equal HF greedy: the gather of the other rows changes nothing)."""
    engine = tiny_model.engine()
    ps = _prompts(tiny_model.hf.config.vocab_size)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    asks = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    outs = engine.generate(ps + [ps[2]], [asks] * len(ps) + [plain])
    for p, out in zip(ps + [ps[2]], outs):
        assert out.error is None and out.token_ids == tiny_model.hf_greedy(p, 6, ignore_eos=True)
    for out in outs[:-1]:
        check_output(out, tiny_model.hf, 3, 2, decode=lambda t: tiny_model.tokenizer.decode([t], skip_special_tokens=False))
        assert all(out.logprobs[i][t].rank == 1 for i, t in enumerate(out.token_ids))  # greedy: the top token
    assert outs[-1].logprobs is None and outs[-1].prompt_logprobs is None


def test_prompt_logprobs_across_prefill_chunks(tiny_llama):
    """A prompt longer than the step's token budget and the prefill chunk size (while another request
    decodes) is prefilled in several chunks: every prompt position still gets its logprobs."""
    base = tiny_llama.engine(max_num_tokens=24)
    engine = Engine(tiny_llama.graph, base.cache, tiny_llama.tokenizer, prefill_chunk_size=10)
    long_prompt, short = _prompts(512, [80, 5], seed=7)
    decoding = engine.add_request(short, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=1))
    engine.step()
    chunked = engine.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                             logprobs=5, prompt_logprobs=5))
    steps = 0
    while not chunked.finished:
        engine.step()
        steps += 1
    assert steps >= 80 // 10 + 3  # chunks of at most 10 prompt tokens beside the decode
    while engine.has_unfinished_requests:
        engine.step()
    out = engine.output(chunked)
    assert out.token_ids == tiny_llama.hf_greedy(long_prompt, 4, ignore_eos=True)
    check_output(out, tiny_llama.hf, 5, 5)
    other = engine.output(decoding)
    assert other.token_ids == tiny_llama.hf_greedy(short, 30, ignore_eos=True) and len(other.logprobs) == 30
    assert other.prompt_logprobs is None


def test_sampled_tokens_get_raw_logprobs(tiny_hybrid):
    """With temperature, top-k and top-p the logprobs are still the raw model distribution's;
    k = 0 gives the chosen token alone."""
    engine = tiny_hybrid.engine()
    ps = _prompts(512, [7, 12], seed=11)
    sp = SamplingParams(temperature=1.7, top_k=20, top_p=0.9, seed=5, max_tokens=8, ignore_eos=True, logprobs=0)
    outs = engine.generate(ps, sp)
    for out in outs:
        ref = hf_logprobs(tiny_hybrid.hf, out.prompt_token_ids + out.token_ids)
        n = len(out.prompt_token_ids)
        assert [list(e) for e in out.logprobs] == [[t] for t in out.token_ids]
        for i, (t, e) in enumerate(zip(out.token_ids, out.logprobs)):
            assert abs(e[t].logprob - ref[n - 1 + i, t].item()) < TOL
    assert any(e[t].rank > 1 for out in outs for t, e in zip(out.token_ids, out.logprobs))  # really sampled


def test_stream_snapshots_carry_the_logprobs_so_far(tiny_llama):
    engine = tiny_llama.engine()
    ps = _prompts(512, [6, 15], seed=2)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    snapshots = list(engine.stream(ps, sp))
    for s in snapshots:
        assert len(s.logprobs) == len(s.token_ids) and len(s.prompt_logprobs) == len(s.prompt_token_ids)
    finals = sorted((s for s in snapshots if s.finished), key=lambda s: s.request_id)
    assert len(snapshots) > len(finals)  # tokens were streamed one by one
    generated = engine.generate(ps, sp)
    for f, g in zip(finals, generated):
        assert f.token_ids == g.token_ids
        for a, b in zip(f.logprobs + f.prompt_logprobs[1:], g.logprobs + g.prompt_logprobs[1:]):
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-6 for t in a)


# ---- exact: the fake model's logits are one-hot * sharpness, so every logprob is known ----

SHARP = 10.0
LOG_Z = math.log(math.exp(SHARP) + VOCAB - 1)


def _check_fake(entry, token, context, k):
    predicted = next_token(context)
    assert list(entry)[0] == token and len(entry) in (k, k + 1)
    want = SHARP - LOG_Z if token == predicted else -LOG_Z
    assert abs(entry[token].logprob - want) < 1e-5 and entry[token].rank == (1 if token == predicted else 2)
    assert entry[token].decoded_token == f"w{token}"
    if k:
        assert predicted in entry and entry[predicted].rank == 1
    for t, lp in entry.items():
        assert abs(lp.logprob - (SHARP - LOG_Z if t == predicted else -LOG_Z)) < 1e-5


FAKE_SCENARIOS = {
    "mixed_lengths": (dict(), prompts([3, 9, 1, 17])),
    "chunked_prefill": (dict(max_num_tokens=8), prompts([23, 5, 14])),
    "preemption": (dict(max_batch_size=4, max_seq_len=32, page_size=4, num_pages=10), prompts([10, 12, 8, 11])),
}


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("name", sorted(FAKE_SCENARIOS))
def test_exact_on_a_model_that_returns_every_tokens_logits(name, overlap):
    """The fake model computes no gather (logits for every token: the engine picks the rows); with
    the overlap scheduler, chunked prefills and preempted requests (recomputed: no position twice)."""
    cache_kw, ps = FAKE_SCENARIOS[name]
    engine = Engine(PagedSumModel(sharpness=SHARP), make_cache(**cache_kw), FakeTokenizer(), overlap=overlap)
    sps = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=i % 3, prompt_logprobs=2 - i % 3)
           for i in range(len(ps))]
    outs = engine.generate(ps, sps)
    if name == "preemption":
        assert engine.scheduler.num_preemptions > 0
    for p, sp, out in zip(ps, sps, outs):
        assert out.token_ids == expected_tokens(p, 9)
        assert len(out.logprobs) == 9 and len(out.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
        tokens = p + out.token_ids
        for i in range(1, len(tokens)):
            entry = out.prompt_logprobs[i] if i < len(p) else out.logprobs[i - len(p)]
            _check_fake(entry, tokens[i], tokens[:i], sp.prompt_logprobs if i < len(p) else sp.logprobs)
