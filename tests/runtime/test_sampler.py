"""The vectorized sampler: greedy, temperature, top-k, top-p, seeds."""

import torch

from autodeploy.runtime.sampler import Sampler, SamplingBatch, filter_top_k_top_p, fold_seed, hash32, two_pass_argmax
from autodeploy.runtime.sampling_params import SamplingParams


def lowbias32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def batch(n, seeds=None, step=0, **kw):
    params = [SamplingParams(**kw)] * n
    return SamplingBatch.from_params(params, seeds if seeds is not None else list(range(n)), [step] * n)


def test_hash_matches_the_reference_mixer():
    xs = [0, 1, 2, 12345, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert hash32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    assert 0 <= fold_seed(2**63 + 5) < 2**32 and fold_seed(7) == 7 and fold_seed(2**40 + 7) != 7


def test_greedy_is_argmax_and_needs_no_randomness():
    logits = torch.randn(5, 50)
    assert torch.equal(Sampler()(logits, batch(5, temperature=0.0)), logits.argmax(-1))


def test_two_pass_argmax_is_argmax_ties_included():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (7, 96), generator=gen).to(torch.bfloat16)  # many ties within and across slices
    logits[3, 50] = logits[3, 10] = 9  # the first of two maxima in different slices
    logits[5] = 0  # all equal: index 0
    for chunks in (1, 4, 12, 96):
        assert torch.equal(two_pass_argmax(logits, chunks), logits.argmax(-1))
    assert two_pass_argmax(logits, 12)[3] == 10 and two_pass_argmax(logits, 12)[5] == 0


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(64, 40)
    s = Sampler()
    assert torch.equal(s(logits, batch(64, temperature=1.5, top_k=1)), logits.argmax(-1))
    assert torch.equal(s(logits, batch(64, temperature=0.7, top_p=1e-6)), logits.argmax(-1))


def test_filter_masks_exactly():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    out = filter_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.8]))
    assert torch.isfinite(out).tolist() == [[True, True, True, False, False]]  # 0.5+0.2 < 0.8 <= 0.85
    out = filter_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False, False]]
    out = filter_top_k_top_p(logits[:, [3, 0, 4, 1, 2]], torch.tensor([0]), torch.tensor([0.5]))
    assert torch.isfinite(out).tolist() == [[False, True, False, False, False]]  # order-independent


def test_distribution_matches_softmax_with_temperature_top_k_top_p():
    torch.manual_seed(0)
    vocab, n = 8, 40000
    base = torch.randn(vocab) * 1.5
    logits = base.expand(n, vocab)
    for kw in [dict(temperature=1.0), dict(temperature=0.5, top_k=4), dict(temperature=2.0, top_p=0.7)]:
        tokens = Sampler()(logits, batch(n, **kw))
        freq = torch.bincount(tokens, minlength=vocab).double() / n
        t = kw["temperature"]
        target = filter_top_k_top_p(base[None] / t, torch.tensor([kw.get("top_k", 0)]), torch.tensor([kw.get("top_p", 1.0)]))
        expected = target.softmax(-1)[0].double()
        assert (freq - expected).abs().max() < 0.012, (kw, freq, expected)
        assert freq[expected == 0].sum() == 0


def test_seed_and_step_decide_the_draw():
    logits = torch.zeros(6, 1000)
    s = Sampler()
    a = s(logits, batch(6, seeds=[3, 3, 4, 5, 6, 7], temperature=1.0))
    b = s(logits[:1], batch(1, seeds=[3], temperature=1.0))
    assert a[0] == a[1] == b[0]  # same seed, same draw, whatever the batch
    assert len(set(a[1:].tolist())) == 5
    c = s(logits[:1], batch(1, seeds=[3], step=1, temperature=1.0))
    assert c[0] != a[0]


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9)]
    out = Sampler()(logits, SamplingBatch.from_params(params, [1, 2, 3, 4], [0] * 4))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert out[1] in logits[1].topk(5).indices
