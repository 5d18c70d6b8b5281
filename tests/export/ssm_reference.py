"""How the installed transformers computes the Mamba2 SSD scan that ``autodeploy::ssm_scan`` ports."""

from __future__ import annotations

import torch


def hf_scan_is_einsum() -> bool:
    """Our scan ports the einsum formulation of transformers 5.2x (5.24); older releases (5.17)
    sum broadcast products instead: the same math, summed in another order."""
    import inspect

    from transformers.models.nemotron_h import modeling_nemotron_h

    from autodeploy.export.patches.ssm_helpers import underlying_function

    return "einsum" in inspect.getsource(underlying_function(modeling_nemotron_h.mamba2_chunk_scan))


def assert_equal_to_hf_scan_path(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Bit-exact where transformers computes the scan like we do; otherwise only rounding may
    differ (max abs diff ~1e-6 on tiny_hybrid's logits with transformers 5.17)."""
    if hf_scan_is_einsum():
        assert torch.equal(ours, theirs), f"max abs diff {(ours - theirs).abs().max().item()}"
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
