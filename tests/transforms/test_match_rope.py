"""RoPE matcher edge cases: bsnd layout, tables without HF's unsqueeze, unpaired applications."""

from __future__ import annotations

import torch

from hf_zoo import run_pipeline
from hf_zoo import count_target, export_module, sample_inputs

rope_op = torch.ops.autodeploy.rope.default
aten = torch.ops.aten


class TinyRope(torch.nn.Module):
    def __init__(self, layout: str, rotate_k: bool = True, heads=4, head_dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.layout, self.rotate_k, self.h, self.d = layout, rotate_k, heads, head_dim
        self.emb = torch.nn.Embedding(128, heads * head_dim)
        self.q = torch.nn.Linear(heads * head_dim, heads * head_dim)
        self.k = torch.nn.Linear(heads * head_dim, heads * head_dim)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, input_ids, position_ids):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

        x = self.emb(input_ids)
        b, s, _ = x.shape
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q, k = self.q(x).view(b, s, self.h, self.d), self.k(x).view(b, s, self.h, self.d)
        if self.layout == "bsnd":  # rotate before the transpose (unsqueeze_dim=2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        elif self.layout == "table_4d":  # tables already [B, 1, S, D], no unsqueeze next to the rotation
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            cos4, sin4 = cos[:, None], sin[:, None]
            q = q * cos4 + rotate_half(q) * sin4
            if self.rotate_k:
                k = k * cos4 + rotate_half(k) * sin4
        return torch.cat([q.flatten(2), k.flatten(2)], dim=-1)


def _run(module):
    gm, report = run_pipeline(export_module(module))
    for batch, seq in [(1, 1), (2, 9)]:
        ids, pos = sample_inputs(batch, seq, offset=5)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids, pos), module(ids, pos), rtol=0, atol=1e-6)
    return gm, report


def test_bsnd_layout_needs_no_transposes():
    gm, _ = _run(TinyRope("bsnd"))
    (node,) = [n for n in gm.graph.nodes if n.target is rope_op]
    assert all(a.target is not aten.transpose.int for a in node.all_input_nodes)


def test_tables_without_unsqueeze_are_squeezed():
    gm, _ = _run(TinyRope("table_4d"))
    (node,) = [n for n in gm.graph.nodes if n.target is rope_op]
    assert node.args[2].meta["val"].dim() == 3


def test_unpaired_rotation_is_left_alone():
    gm, report = _run(TinyRope("table_4d", rotate_k=False))
    assert count_target(gm, rope_op) == 0
    assert "without a partner" in report["match_rope_pattern"].note
