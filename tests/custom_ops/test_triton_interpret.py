"""The Triton attention kernels on the CPU through Triton's interpreter (fp32, exact-ish).

The interpreter must be switched on before triton loads: tests/conftest.py sets TRITON_INTERPRET=1
on a machine without CUDA, so the CPU suite (``make test``, CI) runs these; triton comes with the
dev extra. On a GPU machine the kernels are tested for real (tests/gpu/) and this file is skipped.
"""

import os
import platform
import sys
import zlib
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU", allow_module_level=True)
if os.environ.get("CI") and sys.platform == "linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401 - in CI (dev extra installed) a missing triton is a failure, not a skip
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from attn_cases import SMALL_CASES, VARIANT_CASES, make_batch, reference, rel_err, variant_args  # noqa: E402

from autodeploy.custom_ops.cached_attention import get_backend  # noqa: E402
from autodeploy.custom_ops.cached_attention import triton_kernels as tk  # noqa: E402


@pytest.mark.parametrize("case", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
def test_triton_op_matches_reference(case):
    _, seqs, H, KV, D, ps, window, cap = case
    batch = make_batch(seqs, H, KV, D, ps, generator=torch.Generator().manual_seed(zlib.crc32(case[0].encode())))  # str hash() varies per process
    scale = D**-0.5
    ref, kc_ref, vc_ref = reference(batch, scale, window, cap)
    op = get_backend("triton").op()
    out = op(*batch.args(), scale, window, cap)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5
    # the new tokens were written into their pages, and nothing else changed
    assert torch.equal(batch.k_cache.double(), kc_ref) and torch.equal(batch.v_cache.double(), vc_ref)


def test_value_head_dim_differs():
    batch = make_batch([(4, 9), (11, 1)], 4, 2, 16, 8, Dv=8)
    ref, _, vc_ref = reference(batch, 0.3)
    out = get_backend("triton").op()(*batch.args(), 0.3, None, None)
    assert rel_err(out, ref) < 1e-5 and torch.equal(batch.v_cache.double(), vc_ref)


@pytest.mark.parametrize("merge", ["last_split", "launch"])
@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_decode_splits_agree(splits, merge):
    batch = make_batch([(200, 1), (17, 1), (0, 1)], 8, 2, 32, 16)
    ref, kc_ref, _ = reference(batch, 0.2, 100, None)
    out = tk.decode_attention(batch.q[0], batch.k[0], batch.v[0], batch.k_cache, batch.v_cache,
                              batch.input_pos, batch.page_table, 0.2, 100, 0.0, num_splits=splits, merge=merge)
    assert rel_err(out.unsqueeze(0), ref) < 1e-5
    assert torch.equal(batch.k_cache.double(), kc_ref)
    if splits > 1 and merge == "last_split":  # the last split of each group merged them and reset its counter
        assert not tk._COUNTERS[out.device].any()
        again = tk.decode_attention(batch.q[0], batch.k[0], batch.v[0], batch.k_cache, batch.v_cache,
                                    batch.input_pos, batch.page_table, 0.2, 100, 0.0, num_splits=splits)
        assert torch.equal(again, out)


def test_prefill_kernel_handles_decode_rows():
    """Decode rows inside a mixed batch go through the prefill kernel; check it alone on T == B."""
    batch = make_batch([(5, 1), (33, 1), (0, 1)], 4, 2, 16, 8)
    ref, _, _ = reference(batch, 0.25)
    tk.append_kv(batch.k[0], batch.v[0], batch.k_cache, batch.v_cache, batch.input_pos, batch.cu_seqlen,
                 batch.page_table)
    out = tk.prefill_attention(batch.q[0], batch.k_cache, batch.v_cache, batch.input_pos, batch.cu_seqlen,
                               batch.page_table, 0.25, 0, 0.0)
    assert rel_err(out.unsqueeze(0), ref) < 1e-5


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = make_batch([(0, 5), (3, 1)], 4, 2, 16, 8, Dv=8)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.autodeploy.triton_cached_attention(*batch.args(), 0.25, None, None)
    assert out.shape == (1, 6, 4, 8)


@pytest.mark.parametrize("window,cap", [(None, None), (33, None), (20, 4.0)])
def test_prefill_small_tiles_cover_unmasked_blocks(window, cap):
    """Small tiles make most key blocks fully visible (the unmasked path) next to masked edges."""
    batch = make_batch([(0, 70), (40, 50), (7, 1)], 4, 2, 16, 8)
    ref, _, _ = reference(batch, 0.25, window, cap)
    tk.append_kv(batch.k[0], batch.v[0], batch.k_cache, batch.v_cache, batch.input_pos, batch.cu_seqlen,
                 batch.page_table)
    out = tk.prefill_attention(batch.q[0], batch.k_cache, batch.v_cache, batch.input_pos, batch.cu_seqlen,
                               batch.page_table, 0.25, window or 0, cap or 0.0, block_m=16, block_n=16)
    assert rel_err(out.unsqueeze(0), ref) < 1e-5


@pytest.mark.parametrize("case", VARIANT_CASES, ids=[c[0] for c in VARIANT_CASES])
def test_triton_variants_match_reference(case):
    name, seqs, H, KV, D, ps, variants = case
    batch = make_batch(seqs, H, KV, D, ps, generator=torch.Generator().manual_seed(len(name)))
    kwargs = variant_args(variants, H)
    ref, kc_ref, _ = reference(batch, D**-0.5, **kwargs)
    out = get_backend("triton").op()(*batch.args(), D**-0.5, **kwargs)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(batch.k_cache.double(), kc_ref)


@pytest.mark.parametrize("merge", ["last_split", "launch"])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_splits_with_sinks_alibi_and_chunks(splits, merge):
    """A sink joins the denominator once, in the decode kernel or in the combine step."""
    batch = make_batch([(200, 1), (17, 1), (0, 1)], 8, 2, 32, 16)
    kwargs = variant_args(dict(sinks=True, alibi=True, attention_chunk_size=90), 8)
    ref, _, _ = reference(batch, 0.2, **kwargs)
    out = tk.decode_attention(batch.q[0], batch.k[0], batch.v[0], batch.k_cache, batch.v_cache, batch.input_pos,
                              batch.page_table, 0.2, 0, 0.0, num_splits=splits, sinks=kwargs["sinks"],
                              alibi_slopes=kwargs["alibi_slopes"], chunk=90, merge=merge)
    assert rel_err(out.unsqueeze(0), ref) < 1e-5


@pytest.mark.parametrize("chunk,window", [(16, None), (13, None), (24, 20)])
def test_prefill_small_tiles_with_chunks(chunk, window):
    """Chunks bound the key range like a window: fully visible blocks between masked edges."""
    batch = make_batch([(0, 70), (40, 50), (7, 1)], 4, 2, 16, 8)
    ref, _, _ = reference(batch, 0.25, window, attention_chunk_size=chunk)
    tk.append_kv(batch.k[0], batch.v[0], batch.k_cache, batch.v_cache, batch.input_pos, batch.cu_seqlen,
                 batch.page_table)
    out = tk.prefill_attention(batch.q[0], batch.k_cache, batch.v_cache, batch.input_pos, batch.cu_seqlen,
                               batch.page_table, 0.25, window or 0, 0.0, block_m=16, block_n=16, chunk=chunk)
    assert rel_err(out.unsqueeze(0), ref) < 1e-5


@pytest.mark.parametrize("name", ["gpt_oss", "bloom", "llama4_text"])
def test_default_pipeline_with_triton_equals_hf(name, tmp_path):
    """Sinks, ALiBi and chunked attention through the whole default pipeline with backend=triton."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transforms"))
    from test_attention_families import PROMPTS, Deployment

    from autodeploy.runtime.sampling_params import SamplingParams

    d = Deployment(name, tmp_path, "backend=triton")
    outs = d.built.engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == [d.hf_greedy(p, 8) for p in PROMPTS]
