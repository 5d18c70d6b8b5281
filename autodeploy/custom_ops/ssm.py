"""SSM canonical ops: causal depthwise conv1d, the Mamba2 (SSD) chunked scan, the Mamba1 selective scan.

HF's PyTorch path pads the sequence to a multiple of ``chunk_size`` and branches on the number of
chunks, which specializes ``seq`` at export. Behind these opaque ops the graph keeps ``batch`` and
``seq`` fully dynamic (seq 1, 7, 16, 100 ... all run), and later transforms see one node per
mixer stage. The math is a line-for-line port of transformers' reference torch path
(``causal_conv1d_fn`` and ``mamba2_chunk_scan``), so outputs equal HF eager bit for bit.

Uncached ops (layout: batch, seq, ...):

``autodeploy::causal_conv1d(x[B,S,C], weight[C,K], bias[C]?, str? activation) -> [B,S,C]``
    Causal depthwise conv over ``seq`` (left zero padding K-1), then ``activation``
    (``"silu"``/``"swish"`` or None), in x's dtype. ``weight`` is HF's ``conv1d.weight.squeeze(1)``.

``autodeploy::ssm_scan(x[B,S,H,P], dt[B,S,H], A[H], B[B,S,G,N], C[B,S,G,N], D[H]?, dt_bias[H]?,
                       float dt_min, float dt_max, int chunk_size, bool dt_softplus=True)
                       -> y[B,S,H,P] float32``
    Mamba2 SSD scan from a zero state: ``dt = clamp(softplus(dt + dt_bias), dt_min, dt_max)``,
    ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``; G groups of B/C shared
    by H/G heads each. ``A`` is ``-exp(A_log)``. The result is float32 like HF's (the mixer casts
    back to the model dtype before ``out_proj``).

``autodeploy::selective_scan(x[B,S,C], dt[B,S,C], A[C,N], B[B,S,N], C[B,S,N], D[C]?, dt_bias[C]?,
                             bool dt_softplus=True) -> y[B,S,C] float32``
    Mamba1 selective scan (Jamba, Mamba, FalconMamba) from a zero state, one state row of N per
    channel: ``dt = softplus(dt + dt_bias)``, ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``,
    ``y_t = h_t C_t + D x_t``. Computed in float32 step by step in HF's order (transformers'
    sequential ``mamba_selective_scan``), so float32 models match HF eager bit for bit. The output
    gate (``y * silu(z)``) stays in the graph.

Per-head / per-channel tensors (``A``, ``D``, ``dt_bias``, conv ``weight``/``bias``) are explicit
arguments with the head or channel dimension first, so tensor parallelism can slice them.
Cached variants for the runtime (flattened batch, per-slot state) are in ``ssm_cached.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = {None: None, "silu": F.silu, "swish": F.silu}


def _activation(name: str | None):
    if name not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: unsupported activation {name!r} (supported: silu, swish, None)")
    return _ACTIVATIONS[name]


# ----- shared math (also used by the cached ops) ---------------------------------------------------


def conv1d_channels_first(x_bcs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          activation: str | None) -> torch.Tensor:
    """HF ``causal_conv1d_fn``: x [B, C, S] -> [B, C, S] (zero history)."""
    seq_len = x_bcs.shape[-1]
    out = F.conv1d(x_bcs.to(weight.dtype), weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1,
                   groups=x_bcs.shape[1])[..., :seq_len]
    act = _activation(activation)
    if act is not None:
        out = act(out)
    return out.to(x_bcs.dtype)


def _pad_seq(t: torch.Tensor, pad: int) -> torch.Tensor:
    pad_shape = (0, 0, 0, 0, 0, pad, 0, 0) if t.dim() == 4 else (0, 0, 0, pad, 0, 0)
    return F.pad(t, pad_shape, mode="constant", value=0)


def _chunks(t: torch.Tensor, pad: int, chunk_size: int) -> torch.Tensor:
    t = _pad_seq(t, pad)
    if t.dim() == 3:
        return t.reshape(t.shape[0], -1, chunk_size, t.shape[2])
    return t.reshape(t.shape[0], -1, chunk_size, t.shape[2], t.shape[3])


def _segment_sum(t: torch.Tensor) -> torch.Tensor:
    chunk_size = t.size(-1)
    t = t[..., None].expand(*t.size(), chunk_size)
    mask = torch.tril(torch.ones(chunk_size, chunk_size, device=t.device, dtype=torch.bool), diagonal=-1)
    t = t.masked_fill(~mask, 0)
    segsum = torch.cumsum(t, dim=-2)
    mask = torch.tril(torch.ones(chunk_size, chunk_size, device=t.device, dtype=torch.bool), diagonal=0)
    return segsum.masked_fill(~mask, -torch.inf)


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_min: float,
                  dt_max: float) -> torch.Tensor:
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return torch.clamp(dt, min=dt_min, max=dt_max)


def chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               chunk_size: int, D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
               initial_states: torch.Tensor | None = None, dt_softplus: bool = True,
               dt_min: float = 0.0, dt_max: float = float("inf")) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD chunked scan (HF ``mamba2_chunk_scan``). Returns (y [B,S,H,P] fp32, final state [B,H,P,N] fp32)."""
    batch_size, seq_len, num_heads, head_dim = x.shape
    num_groups = B.shape[2]
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_min, dt_max)

    x = x.float()
    B = B.float().repeat_interleave(num_heads // num_groups, dim=2, output_size=num_heads)
    C = C.float().repeat_interleave(num_heads // num_groups, dim=2, output_size=num_heads)
    pad = (chunk_size - seq_len % chunk_size) % chunk_size
    D_residual = D[..., None] * _pad_seq(x, pad) if D is not None else None

    x = x * dt[..., None].float()
    A = A.to(x.dtype) * dt.float()
    # b = batch, c = chunk, l/s = position in chunk, h = head, p = head_dim, n = state
    x, A, B, C = [_chunks(t, pad, chunk_size) for t in (x, A, B, C)]
    A = A.permute(0, 3, 1, 2)
    A_cumsum = torch.cumsum(A, dim=-1)

    # 1. intra-chunk (diagonal blocks)
    L = torch.exp(_segment_sum(A))
    G = torch.einsum("bclhn,bcshn->bclsh", C, B)
    M = G * L.permute(0, 2, 3, 4, 1)
    Y_diag = torch.einsum("bclsh,bcshp->bclhp", M, x)

    # 2. state at the end of each chunk
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    B_decay = B * decay_states.permute(0, -2, -1, 1)[..., None]
    states = torch.einsum("bclhn,bclhp->bchpn", B_decay, x)

    # 3. inter-chunk recurrence
    previous = (initial_states[:, None].to(dtype=states.dtype, device=states.device)
                if initial_states is not None else torch.zeros_like(states[:, :1]))
    states = torch.cat([previous, states], dim=1)
    decay_chunk = torch.exp(_segment_sum(F.pad(A_cumsum[:, :, :, -1], (1, 0)))).transpose(1, 3)
    new_states = torch.einsum("bzch,bzhpn->bchpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. state -> output per chunk
    state_decay_out = torch.exp(A_cumsum)
    C_times_states = torch.einsum("bclhn,bchpn->bclhp", C, states)
    Y_off = C_times_states * state_decay_out.permute(0, 2, 3, 1)[..., None]

    y = (Y_diag + Y_off).contiguous().reshape(batch_size, -1, num_heads, head_dim)
    if D_residual is not None:
        y = y + D_residual
    if pad > 0:
        y = y[:, :seq_len]
    return y, final_state


# ----- uncached ops ------------------------------------------------------------------------------


@torch.library.custom_op("autodeploy::causal_conv1d", mutates_args=())
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    return conv1d_channels_first(x.transpose(1, 2), weight, bias, activation).transpose(1, 2).contiguous()


@causal_conv1d.register_fake
def _causal_conv1d_fake(x, weight, bias=None, activation=None):
    _activation(activation)
    return x.new_empty(x.shape)


@torch.library.custom_op("autodeploy::ssm_scan", mutates_args=())
def ssm_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_min: float, dt_max: float,
             chunk_size: int, dt_softplus: bool = True) -> torch.Tensor:
    y, _ = chunk_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                      dt_min=dt_min, dt_max=dt_max)
    return y.contiguous()  # the scan cuts its padded chunks off; the fake kernel promises contiguous


@ssm_scan.register_fake
def _ssm_scan_fake(x, dt, A, B, C, D, dt_bias, dt_min, dt_max, chunk_size, dt_softplus=True):
    return x.new_empty(x.shape, dtype=torch.float32)


# ----- Mamba1 selective scan ---------------------------------------------------------------------


def selective_scan_steps(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool,
                         state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba1 scan over ``seq``: x/dt [B,S,C], A [C,N], B/C [B,S,N], state [B,C,N] (zeros if None).

    Returns (y [B,S,C] fp32, final state [B,C,N] fp32). Each step is HF's recurrence in HF's order
    (discretize, ``h = dA * h + dt * B * x``, ``y = h @ C``), computed per step so memory stays
    O(B*C*N) whatever the sequence length.
    """
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt, A, x, B, C = dt.float(), A.float(), x.float(), B.float(), C.float()
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    state = state.float()
    ys = []
    for t in range(x.shape[1]):
        dA = torch.exp(A[None] * dt[:, t, :, None])  # [B, C, N]
        dBx = dt[:, t, :, None] * B[:, None, t, :] * x[:, t, :, None]
        state = dA * state + dBx
        ys.append(torch.matmul(state, C[:, t, :, None])[..., 0])
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    if D is not None:
        y = y + x * D.float()
    return y, state


@torch.library.custom_op("autodeploy::selective_scan", mutates_args=())
def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool = True) -> torch.Tensor:
    y, _ = selective_scan_steps(x, dt, A, B, C, D, dt_bias, dt_softplus)
    return y.contiguous()


@selective_scan.register_fake
def _selective_scan_fake(x, dt, A, B, C, D, dt_bias, dt_softplus=True):
    return x.new_empty(x.shape, dtype=torch.float32)
