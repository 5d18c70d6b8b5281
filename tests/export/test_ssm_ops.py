"""SSM custom ops: equal to HF's torch path, fake kernels, and cached prefill/decode == uncached."""

from __future__ import annotations

import random

import pytest
import torch

import autodeploy.custom_ops.ssm  # noqa: F401 - registers the ops
import autodeploy.custom_ops.ssm_cached  # noqa: F401
from ssm_reference import assert_equal_to_hf_scan_path

ops = torch.ops.autodeploy
H, P, G, N, C_K = 8, 16, 2, 16, 4  # heads, head_dim, groups, state, conv kernel
CONV_CH = H * P + 2 * G * N


def _ssm_inputs(batch: int, seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(
        x=r(batch, seq, H, P), dt=r(batch, seq, H), A=-torch.exp(r(H) * 0.5), B=r(batch, seq, G, N),
        C=r(batch, seq, G, N), D=r(H), dt_bias=r(H) * 0.1,
    )


def _conv_params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(CONV_CH, C_K, generator=gen) * 0.3, torch.randn(CONV_CH, generator=gen) * 0.1


@pytest.mark.parametrize("seq", [1, 7, 16, 33])
def test_ssm_scan_equals_hf_chunk_scan(seq):
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    i = _ssm_inputs(2, seq)
    ours = ops.ssm_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["dt_bias"], 0.001, float("inf"), 16)
    theirs = mamba2_chunk_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk_size=16, D=i["D"], dt_bias=i["dt_bias"],
                               dt_softplus=True, dt_limit=(0.001, float("inf")))
    assert ours.dtype == torch.float32 and ours.shape == (2, seq, H, P)
    assert_equal_to_hf_scan_path(ours, theirs)


@pytest.mark.parametrize("seq", [1, 5, 20])
def test_causal_conv1d_equals_hf(seq):
    from transformers.models.nemotron_h.modeling_nemotron_h import causal_conv1d_fn

    weight, bias = _conv_params()
    x = torch.randn(3, seq, CONV_CH)
    ours = ops.causal_conv1d(x, weight, bias, "silu")
    theirs = causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2)
    assert torch.equal(ours, theirs)
    assert torch.equal(ops.causal_conv1d(x, weight, None, None)[:, :1], (x[:, :1] * weight[:, -1]))


def test_unsupported_activation_is_named():
    weight, bias = _conv_params()
    with pytest.raises(ValueError, match="unsupported activation 'gelu'"):
        ops.causal_conv1d(torch.randn(1, 3, CONV_CH), weight, bias, "gelu")


def test_opcheck_uncached_ops():
    weight, bias = _conv_params()
    torch.library.opcheck(ops.causal_conv1d.default, (torch.randn(2, 5, CONV_CH), weight, bias, "silu"))
    i = _ssm_inputs(2, 5)
    torch.library.opcheck(ops.ssm_scan.default, (i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["dt_bias"],
                                                 0.0, float("inf"), 4, True))


def test_fake_kernels_keep_seq_symbolic():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    i = _ssm_inputs(2, 9)
    weight, bias = _conv_params()
    x_conv = torch.randn(2, 9, CONV_CH)
    with mode:
        fake = {k: mode.from_tensor(v, static_shapes=False) for k, v in i.items()}
        y = ops.ssm_scan(fake["x"], fake["dt"], fake["A"], fake["B"], fake["C"], fake["D"], fake["dt_bias"],
                         0.0, float("inf"), 16)
        xc = mode.from_tensor(x_conv, static_shapes=False)
        yc = ops.causal_conv1d(xc, mode.from_tensor(weight), mode.from_tensor(bias), "silu")
    assert y.dtype == torch.float32 and y.shape == fake["x"].shape and isinstance(y.shape[1], torch.SymInt)
    assert yc.shape == xc.shape and isinstance(yc.shape[1], torch.SymInt)


def test_opcheck_cached_ops():
    weight, bias = _conv_params()
    i = _ssm_inputs(1, 5)
    meta = (torch.tensor([3, 1, 1], dtype=torch.int32), torch.tensor([0, 4, 0], dtype=torch.int32),
            torch.tensor([0, 3, 4, 5], dtype=torch.int32), torch.tensor([2, 0, 1], dtype=torch.int32))
    torch.library.opcheck(ops.cached_causal_conv1d.default,
                          (torch.randn(1, 5, CONV_CH), weight, bias, "silu", *meta, torch.randn(3, CONV_CH, C_K - 1)))
    torch.library.opcheck(ops.cached_ssm_scan.default,
                          (i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["dt_bias"], 0.0, float("inf"), 4, True,
                           *meta, torch.randn(3, H, P, N)))


# ----- cached ops -------------------------------------------------------------------------------


def _run_cached(lengths: list[int], seed: int, num_slots: int = 6, max_prefill_chunk: int = 6):
    """Feed each sequence through the cached ops in a random schedule of prefill chunks and decodes.

    Every step mixes sequences at different positions (prefill chunks first, then decodes, as the
    runtime lays them out); slots are shuffled and hold garbage from earlier use.
    Returns per-sequence (conv_out, ssm_out) concatenated over steps.
    """
    rng = random.Random(seed)
    weight, bias = _conv_params(seed)
    data = [dict(conv=torch.randn(1, n, CONV_CH), **_ssm_inputs(1, n, seed=seed + 10 + k)) for k, n in enumerate(lengths)]
    shared = _ssm_inputs(1, 1, seed=seed)  # A, D, dt_bias shared by all sequences (layer params)
    slots = rng.sample(range(num_slots), len(lengths))
    conv_state = torch.randn(num_slots, CONV_CH, C_K - 1)  # stale values must be ignored at input_pos 0
    ssm_state = torch.randn(num_slots, H, P, N)
    pos = [0] * len(lengths)
    outs = [([], []) for _ in lengths]
    while any(p < n for p, n in zip(pos, lengths)):
        step = []
        for k, (p, n) in enumerate(zip(pos, lengths)):
            if p >= n or rng.random() < 0.25:
                continue  # finished, or not scheduled this step
            # prompt tokens go in chunks; later tokens one at a time (decode)
            take = rng.randint(2, max_prefill_chunk) if p < n // 2 else 1
            step.append((k, min(take, n - p)))
        if not step:
            continue
        step.sort(key=lambda kv: kv[1] == 1)  # prefills first, then decodes
        seq_len = torch.tensor([t for _, t in step], dtype=torch.int32)
        input_pos = torch.tensor([pos[k] for k, _ in step], dtype=torch.int32)
        cu = torch.zeros(len(step) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(seq_len, 0)
        slot_idx = torch.tensor([slots[k] for k, _ in step], dtype=torch.int32)
        cat = lambda key: torch.cat([data[k][key][:, pos[k]:pos[k] + t] for k, t in step], dim=1)  # noqa: E731
        conv_out = ops.cached_causal_conv1d(cat("conv"), weight, bias, "silu", seq_len, input_pos, cu, slot_idx,
                                            conv_state)
        ssm_out = ops.cached_ssm_scan(cat("x"), cat("dt"), shared["A"], cat("B"), cat("C"), shared["D"],
                                      shared["dt_bias"], 0.001, float("inf"), 4, True, seq_len, input_pos, cu,
                                      slot_idx, ssm_state)
        for j, (k, t) in enumerate(step):
            outs[k][0].append(conv_out[:, cu[j]:cu[j + 1]])
            outs[k][1].append(ssm_out[:, cu[j]:cu[j + 1]])
            pos[k] += t
    # uncached reference: each sequence alone, whole, from a zero state
    for k, n in enumerate(lengths):
        d = data[k]
        ref_conv = ops.causal_conv1d(d["conv"], weight, bias, "silu")
        ref_ssm = ops.ssm_scan(d["x"], d["dt"], shared["A"], d["B"], d["C"], shared["D"], shared["dt_bias"],
                               0.001, float("inf"), 4)
        torch.testing.assert_close(torch.cat(outs[k][0], dim=1), ref_conv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat(outs[k][1], dim=1), ref_ssm, rtol=1e-4, atol=1e-4)
    return conv_state, ssm_state, slots


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_prefill_and_decode_equal_uncached(seed):
    _run_cached([13, 1, 9, 22], seed=seed)


def test_cached_state_after_prefill_equals_final_scan_state():
    from autodeploy.custom_ops.ssm import chunk_scan

    i = _ssm_inputs(1, 11, seed=5)
    weight, bias = _conv_params()
    x_conv = torch.randn(1, 11, CONV_CH)
    conv_state, ssm_state = torch.zeros(2, CONV_CH, C_K - 1), torch.zeros(2, H, P, N)
    meta = (torch.tensor([11], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
            torch.tensor([0, 11], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))
    ops.cached_causal_conv1d(x_conv, weight, bias, "silu", *meta, conv_state)
    ops.cached_ssm_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["dt_bias"], 0.0, float("inf"), 4, True,
                        *meta, ssm_state)
    assert torch.equal(conv_state[1], x_conv[0, -(C_K - 1):].T)  # the last K-1 inputs
    assert torch.equal(conv_state[0], torch.zeros_like(conv_state[0]))  # other slots untouched
    _, final = chunk_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], 4, D=i["D"], dt_bias=i["dt_bias"])
    torch.testing.assert_close(ssm_state[1], final[0])


def test_cached_ops_are_registered_as_mutating():
    conv_schema = ops.cached_causal_conv1d.default._schema
    ssm_schema = ops.cached_ssm_scan.default._schema
    assert [a.name for a in conv_schema.arguments if a.alias_info and a.alias_info.is_write] == ["conv_state"]
    assert [a.name for a in ssm_schema.arguments if a.alias_info and a.alias_info.is_write] == ["ssm_state"]


# ----- Mamba1 selective scan --------------------------------------------------------------------

CH, SN = 12, 4  # channels, state size per channel


def _mamba1_inputs(batch: int, seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(x=r(batch, seq, CH), dt=r(batch, seq, CH), A=-torch.exp(r(CH, SN) * 0.5), B=r(batch, seq, SN),
                C=r(batch, seq, SN), D=r(CH), dt_bias=r(CH) * 0.1)


@pytest.mark.parametrize("seq", [1, 7, 33])
def test_selective_scan_equals_hf_jamba_scan(seq):
    from transformers.models.jamba.modeling_jamba import mamba_selective_scan

    i = _mamba1_inputs(2, seq)
    ours = ops.selective_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["dt_bias"], True)
    t = lambda v: v.transpose(1, 2)  # noqa: E731  HF's layout: [batch, channels or state, seq]
    theirs = mamba_selective_scan(t(i["x"]), t(i["dt"]), i["A"], t(i["B"]), t(i["C"]), D=i["D"],
                                  delta_bias=i["dt_bias"], delta_softplus=True)
    assert ours.dtype == torch.float32 and ours.shape == (2, seq, CH)
    assert torch.equal(ours, t(theirs))


def test_opcheck_selective_scan_ops():
    i = _mamba1_inputs(1, 5)
    args = (i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["dt_bias"], True)
    torch.library.opcheck(ops.selective_scan.default, args)
    meta = (torch.tensor([3, 1, 1], dtype=torch.int32), torch.tensor([0, 4, 0], dtype=torch.int32),
            torch.tensor([0, 3, 4, 5], dtype=torch.int32), torch.tensor([2, 0, 1], dtype=torch.int32))
    torch.library.opcheck(ops.cached_selective_scan.default, (*args, *meta, torch.randn(3, CH, SN)))
    schema = ops.cached_selective_scan.default._schema
    assert [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write] == ["ssm_state"]


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_selective_scan_in_any_schedule_equals_uncached(seed):
    """Prefill chunks and decodes of several sequences, interleaved in random steps over shuffled
    slots that hold stale state, equal each sequence scanned alone from a zero state."""
    rng = random.Random(seed)
    lengths = [13, 1, 9, 22]
    data = [_mamba1_inputs(1, n, seed=seed + 10 + k) for k, n in enumerate(lengths)]
    shared = _mamba1_inputs(1, 1, seed=seed)  # A, D, dt_bias: the layer's parameters
    slots = rng.sample(range(6), len(lengths))
    state = torch.randn(6, CH, SN)
    pos, outs = [0] * len(lengths), [[] for _ in lengths]
    while any(p < n for p, n in zip(pos, lengths)):
        step = [(k, min(rng.randint(2, 6) if p < n // 2 else 1, n - p))
                for k, (p, n) in enumerate(zip(pos, lengths)) if p < n and rng.random() > 0.25]
        if not step:
            continue
        step.sort(key=lambda kv: kv[1] == 1)  # prefills first, then decodes
        seq_len = torch.tensor([t for _, t in step], dtype=torch.int32)
        cu = torch.zeros(len(step) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(seq_len, 0)
        meta = (seq_len, torch.tensor([pos[k] for k, _ in step], dtype=torch.int32), cu,
                torch.tensor([slots[k] for k, _ in step], dtype=torch.int32))
        cat = lambda key: torch.cat([data[k][key][:, pos[k]:pos[k] + t] for k, t in step], dim=1)  # noqa: E731
        y = ops.cached_selective_scan(cat("x"), cat("dt"), shared["A"], cat("B"), cat("C"), shared["D"],
                                      shared["dt_bias"], True, *meta, state)
        for j, (k, t) in enumerate(step):
            outs[k].append(y[:, cu[j]:cu[j + 1]])
            pos[k] += t
    for k, d in enumerate(data):
        ref = ops.selective_scan(d["x"], d["dt"], shared["A"], d["B"], d["C"], shared["D"], shared["dt_bias"], True)
        torch.testing.assert_close(torch.cat(outs[k], dim=1), ref, rtol=1e-5, atol=1e-5)
