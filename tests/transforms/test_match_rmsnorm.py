"""RMSNorm matcher: eps from the graph, bf16 casts, and norms it must not touch."""

from __future__ import annotations

import torch

from hf_zoo import run_pipeline
from hf_zoo import export_module, sample_inputs

rms_op = torch.ops.autodeploy.rms_norm.default


class Norms(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(128, 32)
        self.a, self.b = LlamaRMSNorm(32, eps=1e-3), LlamaRMSNorm(32, eps=1e-6)
        self.gemma = GemmaRMSNorm(32, eps=1e-6)  # (1 + w) in fp32 before the cast
        for p in (self.a.weight, self.b.weight, self.gemma.weight):
            torch.nn.init.normal_(p)
        self.to(dtype)

    def forward(self, input_ids, position_ids):
        x = self.emb(input_ids) * 3
        no_weight = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.a(x) + self.b(x * 2) + self.gemma(x) + no_weight


def _run(dtype):
    module = Norms(dtype)
    gm, _ = run_pipeline(export_module(module))
    for batch, seq in [(1, 1), (2, 9)]:
        ids, pos = sample_inputs(batch, seq)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids, pos), module(ids, pos), rtol=0, atol=0)
    return [n.args[2] for n in gm.graph.nodes if n.target is rms_op]


def test_eps_comes_from_the_graph():
    # fp32: Gemma's (1 + w) norm is the same math with weight (1 + w), so it is matched too
    assert sorted(_run(torch.float32)) == [1e-6, 1e-6, 1e-3]


def test_bf16_keeps_only_llama_style_norms():
    # bf16: Gemma multiplies before casting back (other rounding): left as plain code
    assert sorted(_run(torch.bfloat16)) == [1e-6, 1e-3]
