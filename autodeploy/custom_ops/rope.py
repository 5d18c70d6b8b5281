"""``autodeploy::rope``: rotary position embedding of q and k (bsnd), HF math.

``cos``/``sin`` are ``[B,S,R]`` per-element tables aligned with the first R dims of each head,
exactly as HF multiplies them: duplicated halves ``[f0..f(R/2-1), f0..]`` for the rotate-half
layout, repeat-interleaved ``[f0, f0, f1, f1, ..]`` for the interleaved (GPT-J / GLM) layout.
Only the first R of D dims rotate (partial rotary); the rest pass through.
"""

import functools

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x ``[B,S,N,D]``, cos/sin ``[B,S,R]`` with R <= D and R even."""
    rot_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    rotated = rotate_every_two(x_rot) if interleaved else rotate_half(x_rot)
    out = x_rot * cos + rotated * sin
    if x_pass.shape[-1]:
        out = torch.cat((out, x_pass.to(out.dtype)), dim=-1)
    return out.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"autodeploy::rope expects 4-D bsnd q/k, got {q.dim()}-D and {k.dim()}-D")
    if cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(f"autodeploy::rope expects cos/sin [B,S,R] of one shape, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    rot_dim = cos.shape[-1]
    if rot_dim > q.shape[-1] or rot_dim > k.shape[-1]:
        raise ValueError(f"autodeploy::rope: rotary dim {rot_dim} exceeds head dim {q.shape[-1]}/{k.shape[-1]}")


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's math as plain torch code (``compile/inline.py`` hands it to inductor)."""
    _check(q, k, cos, sin)
    return apply_rope(q, cos, sin, interleaved), apply_rope(k, cos, sin, interleaved)


def rope_host(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_reference``'s values with fewer kernels, for the host's graphs (``compile/inline.py``).

    ``rotate_half(x) * sin`` is ``roll(x, D/2) * [-sin_lo, sin_hi]``: the same products, the sign
    moved from x to sin (exact), one kernel for the rotation instead of four."""
    rot = cos.shape[-1]
    if interleaved or rot != q.shape[-1] or rot != k.shape[-1]:  # partial or GPT-J style: the reference
        return rope_reference(q, k, cos, sin, interleaved)
    cos, signed_sin = cos.unsqueeze(2), sin.unsqueeze(2) * _half_signs(rot, sin.dtype, sin.device)
    return tuple(x * cos + x.roll(rot // 2, -1) * signed_sin for x in (q, k))


@functools.lru_cache(maxsize=None)
def _half_signs(rot: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([-1.0] * (rot // 2) + [1.0] * (rot // 2), dtype=dtype, device=device)


@torch.library.custom_op("autodeploy::rope", mutates_args=())
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_reference(q, k, cos, sin, interleaved)


@rope.register_fake
def _rope_fake(q, k, cos, sin, interleaved):
    _check(q, k, cos, sin)
    return (
        q.new_empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype)),
        k.new_empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype)),
    )
