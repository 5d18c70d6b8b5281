"""The torch cached-attention op against naive per-sequence causal attention on random tensors."""

import math
import random

import pytest
import torch

from autodeploy.custom_ops.cached_attention import get_backend
from autodeploy.runtime.sequence_info import SequenceInfo

PAGE_SIZE = 4
NUM_PAGES = 64


def naive_attention(q, k, v, scale, sliding_window=None, logit_cap=None):
    """q [S, H, D] for the last S positions of k/v [L, KV, D]; plain causal attention per head."""
    S, H, _ = q.shape
    L, KV, _ = k.shape
    k = k.repeat_interleave(H // KV, dim=1)
    v = v.repeat_interleave(H // KV, dim=1)
    scores = torch.einsum("shd,lhd->hsl", q.double(), k.double()) * scale
    if logit_cap is not None:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    qpos = torch.arange(L - S, L)[:, None]
    kpos = torch.arange(L)[None, :]
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hsl,lhd->shd", scores.softmax(-1), v.double())


class Harness:
    """Sequences with random full Q/K/V; each step feeds a chunk of every listed sequence."""

    def __init__(self, lengths, heads=4, kv_heads=2, dim=8, dim_v=None, dtype=torch.float32, **attn):
        gen = torch.Generator().manual_seed(0)
        dim_v = dim_v or dim
        self.seqs = [
            {
                "q": torch.randn(n, heads, dim, generator=gen, dtype=dtype),
                "k": torch.randn(n, kv_heads, dim, generator=gen, dtype=dtype),
                "v": torch.randn(n, kv_heads, dim_v, generator=gen, dtype=dtype),
                "done": 0,
            }
            for n in lengths
        ]
        free = list(range(1, NUM_PAGES))
        random.Random(0).shuffle(free)  # non-contiguous pages
        for s in self.seqs:
            s["pages"] = [free.pop() for _ in range(math.ceil(len(s["q"]) / PAGE_SIZE))]
        self.k_cache = torch.zeros(NUM_PAGES, PAGE_SIZE, kv_heads, dim, dtype=dtype)
        self.v_cache = torch.zeros(NUM_PAGES, PAGE_SIZE, kv_heads, dim_v, dtype=dtype)
        self.info = SequenceInfo(8, 256, max_pages_per_seq=16)
        self.scale = dim ** -0.5
        self.attn = attn
        self.op = get_backend("torch").op()

    def step(self, chunks):
        """chunks: [(seq index, number of new tokens)]; returns max error vs naive attention."""
        assert all(self.seqs[i]["done"] + n <= len(self.seqs[i]["q"]) for i, n in chunks)
        tok, pos, pages, qs, ks, vs = [], [], [], [], [], []
        for i, n in chunks:
            s = self.seqs[i]
            a = s["done"]
            tok.append([0] * n)
            pos.append(a)
            pages.append(s["pages"])
            qs.append(s["q"][a: a + n]); ks.append(s["k"][a: a + n]); vs.append(s["v"][a: a + n])
        b = self.info.build(tok, pos, pages, [0] * len(chunks))
        m = b.named_args
        out = self.op(torch.cat(qs)[None], torch.cat(ks)[None], torch.cat(vs)[None], m["seq_len"],
                      m["input_pos"], m["cu_seqlen"], m["page_table"], self.k_cache, self.v_cache,
                      self.scale, self.attn.get("sliding_window"), self.attn.get("logit_cap"))
        assert out.shape == (1, b.num_tokens, qs[0].shape[1], vs[0].shape[-1])
        err, off = 0.0, 0
        for (i, n) in chunks:
            s = self.seqs[i]
            end = s["done"] + n
            ref = naive_attention(s["q"][s["done"]: end], s["k"][:end], s["v"][:end], self.scale, **self.attn)
            err = max(err, (out[0, off: off + n].double() - ref).abs().max().item())
            s["done"], off = end, off + n
        return err


@pytest.mark.parametrize("attn", [{}, {"sliding_window": 3}, {"logit_cap": 2.0}, {"sliding_window": 5, "logit_cap": 1.5}])
def test_prefill_then_decode(attn):
    h = Harness([10, 1, 12], **attn)  # final lengths
    assert h.step([(0, 7), (1, 1), (2, 9)]) < 1e-5  # prefill (one of length 1)
    for _ in range(3):
        assert h.step([(0, 1), (2, 1)]) < 1e-5  # decode-only path crossing page boundaries


@pytest.mark.parametrize("attn", [{}, {"sliding_window": 4}])
def test_mixed_prefill_decode_and_chunks(attn):
    h = Harness([9, 21, 15, 6], **attn)
    assert h.step([(0, 6), (1, 8)]) < 1e-5  # full prefill + first chunk
    assert h.step([(1, 5), (2, 13), (0, 1)]) < 1e-5  # later chunk (input_pos > 0), new prefill, a decode
    assert h.step([(1, 7), (3, 5), (0, 1), (2, 1)]) < 1e-5
    assert h.step([(0, 1), (1, 1), (2, 1), (3, 1)]) < 1e-5


def test_gqa_mqa_and_value_dim():
    for heads, kv in [(8, 8), (8, 2), (6, 1)]:
        h = Harness([6, 12], heads=heads, kv_heads=kv, dim=8, dim_v=12)
        assert h.step([(0, 5), (1, 11)]) < 1e-5
        assert h.step([(0, 1), (1, 1)]) < 1e-5


def test_exact_page_multiple_and_single_token_prompts():
    h = Harness([PAGE_SIZE * 2 + 1, 1, PAGE_SIZE])
    assert h.step([(0, PAGE_SIZE * 2), (1, 1), (2, PAGE_SIZE)]) < 1e-5
    assert h.step([(0, 1)]) < 1e-5


def test_bfloat16_runs_close():
    h = Harness([7, 10], dtype=torch.bfloat16)
    assert h.step([(0, 6), (1, 9)]) < 5e-2
    assert h.step([(0, 1), (1, 1)]) < 5e-2


def test_writes_only_its_pages():
    h = Harness([5, 3])
    h.step([(0, 5), (1, 3)])
    used = set(h.seqs[0]["pages"] + h.seqs[1]["pages"])
    for p in range(NUM_PAGES):
        if p not in used:
            assert h.k_cache[p].abs().sum() == 0 and h.v_cache[p].abs().sum() == 0


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = get_backend("torch").op()
    with FakeTensorMode():
        q, k, v = torch.empty(1, 10, 4, 8), torch.empty(1, 10, 2, 8), torch.empty(1, 10, 2, 6)
        meta = [torch.empty(3, dtype=torch.int32)] * 2 + [torch.empty(4, dtype=torch.int32), torch.empty(3, 5, dtype=torch.int32)]
        out = op(q, k, v, *meta, torch.empty(9, 4, 2, 8), torch.empty(9, 4, 2, 6), 0.3, None, None)
        assert out.shape == (1, 10, 4, 6)


def test_unknown_backend_names_the_closest():
    with pytest.raises(ValueError, match="did you mean torch"):
        get_backend("torhc")


@pytest.mark.parametrize("chunks", [([5, 3], [0, 2]), ([1, 1], [5, 3])], ids=["prefill", "decode"])
def test_opcheck(chunks):
    lens, pos = chunks
    info = SequenceInfo(4, 64, 4)
    m = info.build([[0] * n for n in lens], pos, [[1, 2], [3, 4]], [1, 2]).named_args
    T = sum(lens)
    args = (torch.randn(1, T, 4, 8), torch.randn(1, T, 2, 8), torch.randn(1, T, 2, 8),
            *(m[k].clone() for k in ("seq_len", "input_pos", "cu_seqlen", "page_table")),
            torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8), 0.35, None, None)
    torch.library.opcheck(get_backend("torch").op(), args)


def _variant_cases():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
    import attn_cases

    return attn_cases


@pytest.mark.parametrize("case", _variant_cases().VARIANT_CASES, ids=[c[0] for c in _variant_cases().VARIANT_CASES])
def test_variants_match_float64_reference(case):
    """Sinks, ALiBi and chunk-local attention over pages (prefill, chunked prefill, decode, mixed)."""
    cases = _variant_cases()
    name, seqs, H, KV, D, ps, variants = case
    batch = cases.make_batch(seqs, H, KV, D, ps, generator=torch.Generator().manual_seed(len(name)))
    kwargs = cases.variant_args(variants, H)
    ref, kc_ref, _ = cases.reference(batch, D**-0.5, **kwargs)
    plain, _, _ = cases.reference(batch.clone(), D**-0.5, variants.get("sliding_window"), variants.get("logit_cap"))
    assert cases.rel_err(plain, ref) > 1e-2  # the variant changes the answer: the check below can fail
    out = get_backend("torch").op()(*batch.args(), D**-0.5, **kwargs)
    assert cases.rel_err(out, ref) < 1e-6
    assert torch.equal(batch.k_cache.double(), kc_ref)


def test_opcheck_with_variants():
    info = SequenceInfo(4, 64, 4)
    m = info.build([[0] * 5, [0]], [0, 6], [[1, 2], [3, 4]], [1, 2]).named_args
    args = (torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8),
            *(m[k].clone() for k in ("seq_len", "input_pos", "cu_seqlen", "page_table")),
            torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8), 0.35, None, None, torch.randn(4), torch.rand(4), 3)
    torch.library.opcheck(get_backend("torch").op(), args)
