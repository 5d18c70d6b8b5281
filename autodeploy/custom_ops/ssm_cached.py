"""Cached SSM ops for the runtime: flattened batch, per-slot conv and SSM state, updated in place.

Inputs follow the runtime contract (docs/architecture.md): all sequences' new tokens back to back
in ``[1, T, ...]``; ``seq_len[B]`` new tokens per sequence, ``input_pos[B]`` tokens already
processed, ``cu_seqlen[B+1]`` token offsets, ``slot_idx[B]`` the state slot of each sequence
(all int32). A sequence with ``input_pos == 0`` starts from a zero state, whatever its slot held.

``autodeploy::cached_causal_conv1d(x[1,T,C], weight[C,K], bias[C]?, str? activation,
        seq_len[B], input_pos[B], cu_seqlen[B+1], slot_idx[B],
        conv_state(a!)[num_slots, C, K-1]) -> [1,T,C]``
    ``conv_state[s]`` holds the last K-1 inputs (pre-activation) of the sequence in slot s.

``autodeploy::cached_ssm_scan(x[1,T,H,P], dt[1,T,H], A[H], B[1,T,G,N], C[1,T,G,N], D[H]?,
        dt_bias[H]?, float dt_min, float dt_max, int chunk_size, bool dt_softplus,
        seq_len[B], input_pos[B], cu_seqlen[B+1], slot_idx[B],
        ssm_state(a!)[num_slots, H, P, N]) -> y[1,T,H,P] float32``
    ``ssm_state[s]`` is the SSM state after the last processed token (computed in float32, stored
    in the state's dtype). The same dt discretization as ``ssm_scan`` (softplus, then clamp to
    [dt_min, dt_max]) is used for prefill and decode, so chunked prefill + decode equals the
    uncached op over the whole sequence.

``autodeploy::cached_selective_scan(x[1,T,C], dt[1,T,C], A[C,N], B[1,T,N], C[1,T,N], D[C]?,
        dt_bias[C]?, bool dt_softplus, seq_len[B], input_pos[B], cu_seqlen[B+1], slot_idx[B],
        ssm_state(a!)[num_slots, C, N]) -> y[1,T,C] float32``
    Mamba1: ``ssm_state[s]`` is the state after the last processed token; prefill and decode run
    the very recurrence of ``selective_scan``, so any split into chunks and steps equals the
    uncached op over the whole sequence.

Torch reference implementations: sequences with ``seq_len > 1`` (prefill / chunked prefill) loop
one by one through the chunked scan; ``seq_len == 1`` (decode) tokens are processed together. A
decode-only batch (``T == B``: one token per sequence, known from shapes alone) reads nothing on
the host, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from .ssm import _activation, chunk_scan, conv1d_channels_first, discretize_dt, selective_scan_steps


def _split_decode_prefill(seq_len: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    lens = seq_len.tolist()
    decode = [i for i, n in enumerate(lens) if n == 1]
    prefill = [i for i, n in enumerate(lens) if n > 1]
    return lens, decode, prefill


@torch.library.custom_op("autodeploy::cached_causal_conv1d", mutates_args=("conv_state",))
def cached_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                         seq_len: torch.Tensor, input_pos: torch.Tensor, cu_seqlen: torch.Tensor,
                         slot_idx: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
    tokens = x[0]  # [T, C]
    if tokens.shape[0] == seq_len.shape[0]:  # decode-only batch: no host sync
        return _conv_decode(tokens, weight, bias, activation, slot_idx, input_pos == 0, conv_state)[None]
    out = torch.zeros_like(tokens)
    lens, decode, prefill = _split_decode_prefill(seq_len)
    starts = cu_seqlen.tolist()
    positions = input_pos.tolist()
    slots = slot_idx.tolist()
    width = weight.shape[-1] - 1

    for i in prefill:
        seq = tokens[starts[i] : starts[i] + lens[i]].transpose(0, 1)  # [C, L]
        history = conv_state[slots[i]].to(seq.dtype) if positions[i] > 0 else seq.new_zeros(seq.shape[0], width)
        window = torch.cat([history, seq], dim=-1)  # [C, K-1+L]
        conv_state[slots[i]] = window[:, -width:].to(conv_state.dtype)
        # a conv over the history+new window; keep the outputs of the new tokens
        full = conv1d_channels_first(window[None], weight, bias, activation)[0]
        out[starts[i] : starts[i] + lens[i]] = full[:, width:].transpose(0, 1)

    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=x.device)
        slot_t = torch.tensor([slots[i] for i in decode], device=x.device)
        fresh = torch.tensor([positions[i] == 0 for i in decode], device=x.device)
        out[rows] = _conv_decode(tokens[rows], weight, bias, activation, slot_t, fresh, conv_state)
    return out[None]


def _conv_decode(tokens, weight, bias, activation, slots, fresh, conv_state) -> torch.Tensor:
    """One new token per sequence (``tokens [n, C]``): shift it into its slot's window, convolve."""
    width = weight.shape[-1] - 1
    history = conv_state[slots].to(tokens.dtype).masked_fill(fresh[:, None, None], 0)  # [n, C, K-1]
    window = torch.cat([history, tokens[:, :, None]], dim=-1)  # [n, C, K]
    conv_state[slots] = window[:, :, -width:].to(conv_state.dtype)
    y = torch.nn.functional.conv1d(window.to(weight.dtype), weight.unsqueeze(1), bias, groups=window.shape[1])
    act = _activation(activation)
    if act is not None:
        y = act(y)
    return y[:, :, 0].to(tokens.dtype)


@cached_causal_conv1d.register_fake
def _cached_causal_conv1d_fake(x, weight, bias, activation, seq_len, input_pos, cu_seqlen, slot_idx, conv_state):
    _activation(activation)
    return x.new_empty(x.shape)


@torch.library.custom_op("autodeploy::cached_ssm_scan", mutates_args=("ssm_state",))
def cached_ssm_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_min: float, dt_max: float,
                    chunk_size: int, dt_softplus: bool, seq_len: torch.Tensor, input_pos: torch.Tensor,
                    cu_seqlen: torch.Tensor, slot_idx: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    num_heads, head_dim = x.shape[2], x.shape[3]
    if x.shape[1] == seq_len.shape[0]:  # decode-only batch: no host sync
        return _ssm_decode(x[0], dt[0], A, B[0], C[0], D, dt_bias, dt_min, dt_max, dt_softplus, slot_idx,
                           input_pos == 0, ssm_state)[None]
    out = x.new_zeros(x.shape, dtype=torch.float32)[0]  # [T, H, P]
    lens, decode, prefill = _split_decode_prefill(seq_len)
    starts = cu_seqlen.tolist()
    positions = input_pos.tolist()
    slots = slot_idx.tolist()

    for i in prefill:
        sl = slice(starts[i], starts[i] + lens[i])
        initial = ssm_state[slots[i]][None].float() if positions[i] > 0 else None
        y, final = chunk_scan(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], chunk_size, D=D, dt_bias=dt_bias,
                              initial_states=initial, dt_softplus=dt_softplus, dt_min=dt_min, dt_max=dt_max)
        out[sl] = y[0]
        ssm_state[slots[i]] = final[0].to(ssm_state.dtype)

    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=x.device)
        slot_t = torch.tensor([slots[i] for i in decode], device=x.device)
        fresh = torch.tensor([positions[i] == 0 for i in decode], device=x.device)
        out[rows] = _ssm_decode(x[0, rows], dt[0, rows], A, B[0, rows], C[0, rows], D, dt_bias, dt_min, dt_max,
                                dt_softplus, slot_t, fresh, ssm_state)
    return out.reshape(1, -1, num_heads, head_dim)


def _ssm_decode(x, dt, A, B, C, D, dt_bias, dt_min, dt_max, dt_softplus, slots, fresh, ssm_state) -> torch.Tensor:
    """One SSM step per sequence: ``x [n, H, P]``, ``dt [n, H]``, ``B/C [n, G, N]`` -> ``y [n, H, P]`` fp32."""
    num_heads = x.shape[1]
    xs = x.float()
    dts = discretize_dt(dt, dt_bias, dt_softplus, dt_min, dt_max).float()  # [n, H]
    Bs = B.float().repeat_interleave(num_heads // B.shape[1], dim=1)  # [n, H, N]
    Cs = C.float().repeat_interleave(num_heads // C.shape[1], dim=1)
    state = ssm_state[slots].float().masked_fill(fresh[:, None, None, None], 0)  # [n, H, P, N]
    dA = torch.exp(dts * A.float())  # [n, H]
    state = state * dA[:, :, None, None] + (dts[:, :, None] * xs)[..., None] * Bs[:, :, None, :]
    ssm_state[slots] = state.to(ssm_state.dtype)
    y = torch.einsum("nhpd,nhd->nhp", state, Cs)
    if D is not None:
        y = y + xs * D.float()[None, :, None]
    return y


@cached_ssm_scan.register_fake
def _cached_ssm_scan_fake(x, dt, A, B, C, D, dt_bias, dt_min, dt_max, chunk_size, dt_softplus, seq_len, input_pos,
                          cu_seqlen, slot_idx, ssm_state):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("autodeploy::cached_selective_scan", mutates_args=("ssm_state",))
def cached_selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool,
                          seq_len: torch.Tensor, input_pos: torch.Tensor, cu_seqlen: torch.Tensor,
                          slot_idx: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    params = (A, D, dt_bias, dt_softplus)
    if x.shape[1] == seq_len.shape[0]:  # decode-only batch: no host sync
        return _selective_decode(x[0], dt[0], B[0], C[0], params, slot_idx, input_pos == 0, ssm_state)[None]
    out = x.new_zeros(x.shape, dtype=torch.float32)[0]  # [T, C]
    lens, decode, prefill = _split_decode_prefill(seq_len)
    starts = cu_seqlen.tolist()
    positions = input_pos.tolist()
    slots = slot_idx.tolist()

    for i in prefill:
        sl = slice(starts[i], starts[i] + lens[i])
        initial = ssm_state[slots[i]][None] if positions[i] > 0 else None
        y, final = selective_scan_steps(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D, dt_bias, dt_softplus, initial)
        out[sl] = y[0]
        ssm_state[slots[i]] = final[0].to(ssm_state.dtype)

    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=x.device)
        slot_t = torch.tensor([slots[i] for i in decode], device=x.device)
        fresh = torch.tensor([positions[i] == 0 for i in decode], device=x.device)
        out[rows] = _selective_decode(x[0, rows], dt[0, rows], B[0, rows], C[0, rows], params, slot_t, fresh, ssm_state)
    return out[None]


def _selective_decode(x, dt, B, C, params, slots, fresh, ssm_state) -> torch.Tensor:
    """One step per sequence (``x/dt [n, C]``, ``B/C [n, N]``) -> ``y [n, C]`` fp32; the same recurrence as prefill."""
    A, D, dt_bias, dt_softplus = params
    state = ssm_state[slots].float().masked_fill(fresh[:, None, None], 0)  # [n, C, N]
    y, state = selective_scan_steps(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, dt_bias, dt_softplus, state)
    ssm_state[slots] = state.to(ssm_state.dtype)
    return y[:, 0]


@cached_selective_scan.register_fake
def _cached_selective_scan_fake(x, dt, A, B, C, D, dt_bias, dt_softplus, seq_len, input_pos, cu_seqlen, slot_idx,
                                ssm_state):
    return x.new_empty(x.shape, dtype=torch.float32)
