"""triton_prefill.varlen_attention on the CPU through Triton's interpreter, against float64.

It serves every batch with prompt tokens (through the triton op, also covered by
test_triton_interpret.py); these cases aim at its own paths: unmasked and diagonal blocks of the
new keys, a cached prefix from the pages (later chunks), decodes in a mixed batch (the small-tile
branch), windows, soft-capping, GQA group sizes, and the 16-bit tile configuration.
    TRITON_INTERPRET=1 pytest tests/custom_ops/test_triton_prefill_interpret.py
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU", allow_module_level=True)
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from attn_cases import make_batch, reference, rel_err  # noqa: E402

from autodeploy.custom_ops.cached_attention.triton_prefill import varlen_attention  # noqa: E402

# (sequences as (cached, new) tokens, heads, kv heads): fresh prompts, a later chunk, decodes mixed in
CASES = {
    "fresh_prompts": ([(0, 70), (0, 33)], 4, 2),
    "chunk_after_prefix": ([(40, 50), (0, 9)], 4, 2),
    "mixed_with_decodes": ([(0, 37), (12, 20), (7, 1), (0, 1), (64, 1)], 8, 2),
    "mha": ([(5, 21), (9, 1)], 2, 2),
    "gqa_8": ([(3, 30), (30, 1)], 8, 1),
}


@pytest.mark.parametrize("window,cap", [(None, None), (17, None), (None, 5.0), (9, 3.0)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_small_tiles_against_float64(case, window, cap):
    seqs, H, KV = CASES[case]
    batch = make_batch(seqs, H, KV, 16, 8, generator=torch.Generator().manual_seed(len(case)))
    cache_before = batch.k_cache.clone()
    ref, _, _ = reference(batch, 0.25, window, cap)
    # the prefix is in the pages already; the new tokens' K/V only in k/v (this kernel never reads
    # what append_kv writes): no append here, so a read of a new key from the pages would show
    out = varlen_attention(batch.q[0], batch.k[0], batch.v[0], batch.k_cache, batch.v_cache, batch.input_pos,
                           batch.cu_seqlen, batch.page_table, 0.25, window or 0, cap or 0.0, block_m=16, block_n=16)
    assert rel_err(out.unsqueeze(0), ref) < 1e-5
    assert torch.equal(batch.k_cache, cache_before)  # reads only


@pytest.mark.parametrize("block_n_one", [16, 32, 64])
def test_decode_rows_key_blocks(block_n_one):
    """The decodes of a mixed batch with key blocks of their own size (contexts across several)."""
    seqs, H, KV = [(0, 37), (12, 20), (7, 1), (0, 1), (64, 1), (130, 1)], 8, 2
    batch = make_batch(seqs, H, KV, 16, 8, generator=torch.Generator().manual_seed(3))
    ref, _, _ = reference(batch, 0.25)
    out = varlen_attention(batch.q[0], batch.k[0], batch.v[0], batch.k_cache, batch.v_cache, batch.input_pos,
                           batch.cu_seqlen, batch.page_table, 0.25, 0, 0.0, block_m=16, block_n=64,
                           block_n_one=block_n_one)
    assert rel_err(out.unsqueeze(0), ref) < 1e-5


def test_16bit_tiles():
    # fp16: the interpreter computes bf16 wrongly (the old kernels too); the GPU tests run bf16
    batch = make_batch([(0, 150), (20, 70), (90, 1)], 8, 2, 64, 16, dtype=torch.float16)
    ref, _, _ = reference(batch, 0.125)
    out = varlen_attention(batch.q[0], batch.k[0], batch.v[0], batch.k_cache, batch.v_cache, batch.input_pos,
                           batch.cu_seqlen, batch.page_table, 0.125, 0, 0.0)  # 128 x 64 tiles, 3 stages
    assert rel_err(out.unsqueeze(0), ref) < 1e-3  # fp16 operands


def test_config_that_does_not_fit_falls_through(monkeypatch):
    """A GPU without the shared memory for the largest tiles runs the next config (remembered)."""
    from autodeploy.custom_ops.cached_attention import triton_prefill as tp

    real_launch, tried = tp._launch, []

    def launch(*args):
        tried.append(args[-1])
        if args[-1]["num_stages"] == 3:
            raise tp._out_of_resources()[0](200_000, 232_448, "shared memory")
        return real_launch(*args)

    monkeypatch.setattr(tp, "_launch", launch)
    monkeypatch.setattr(tp, "_first_fit", {})
    batch = make_batch([(0, 40), (9, 1)], 4, 2, 16, 8, dtype=torch.float16)
    ref, _, _ = reference(batch, 0.25)
    for _ in range(2):
        out = varlen_attention(batch.q[0], batch.k[0], batch.v[0], batch.k_cache, batch.v_cache, batch.input_pos,
                               batch.cu_seqlen, batch.page_table, 0.25, 0, 0.0)
        assert rel_err(out.unsqueeze(0), ref) < 1e-3
    assert tried == [tp.CONFIGS[0], tp.CONFIGS[1], tp.CONFIGS[1]]  # the second call starts at the fit


@pytest.mark.parametrize("window", [None, 5])
def test_append_in_the_same_launch(window):
    """``append=True``: the kernel writes every new token's K/V into its page slot (each program its
    tokens of its KV head, decodes of a mixed batch too), nothing else in the caches changes, and
    the attention is that of the kernel alone."""
    seqs, H, KV = [(0, 37), (12, 20), (7, 1), (0, 1), (64, 1)], 8, 2
    batch = make_batch(seqs, H, KV, 16, 8, generator=torch.Generator().manual_seed(9))
    ref, kc_ref, vc_ref = reference(batch, 0.25, window)
    assert not torch.equal(batch.k_cache.double(), kc_ref)  # the check below can fail
    out = varlen_attention(batch.q[0], batch.k[0], batch.v[0], batch.k_cache, batch.v_cache, batch.input_pos,
                           batch.cu_seqlen, batch.page_table, 0.25, window or 0, 0.0, block_m=16, block_n=16,
                           append=True)
    assert rel_err(out.unsqueeze(0), ref) < 1e-5
    assert torch.equal(batch.k_cache.double(), kc_ref) and torch.equal(batch.v_cache.double(), vc_ref)
