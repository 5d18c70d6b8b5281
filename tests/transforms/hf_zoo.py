"""Small HF models (random weights, no tokenizer) that cover the patterns the matchers must handle.

Each variant names the HF features it brings and how many canonical ops its graph must end up
with (per model, 2 layers). Models are fp32 so the rewritten graph can be compared with HF eager at
a tight tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

NUM_LAYERS = 2
COMMON: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# every variant is checked on these (batch, seq) shapes; 33 > every sliding window below
SHAPES = [(1, 1), (2, 16), (3, 7), (2, 33)]


@dataclass
class Variant:
    config_class: str
    kwargs: dict[str, Any]
    features: str
    rms_norms: int  # RMSNorms the matcher must find
    moes: int = 0
    attn_implementation: str = "sdpa"
    # per layer (sliding_window, logit_cap) the attention ops must carry
    attention_args: list[tuple[Any, Any]] = field(default_factory=lambda: [(None, None)] * NUM_LAYERS)
    ropes: int = NUM_LAYERS  # RoPEs the matcher must find (0: attention without position encoding)
    ssm_ops: dict[str, int] = field(default_factory=dict)  # e.g. {"causal_conv1d": 2, "ssm_scan": 2}
    kv_heads: Any = None  # K/V heads of the attention ops (or a function giving them); None: config.num_key_value_heads
    own_sizes: bool = False  # the config names its sizes itself (COMMON gives only vocab and token ids)
    # per layer (has sinks, has ALiBi slopes, attention_chunk_size) of the attention ops
    # (None: none, for each attention op of attention_args)
    attention_variants: Any = None
    # experts the MoE matcher leaves as graph code (transformers' grouped_mm stays in the graph)
    experts_as_graph_code: bool = False


L = NUM_LAYERS
def _falcon_attention_kv_heads(heads: int, groups: int) -> int:
    """Falcon's new architecture broadcasts K/V to every query head before attention up to transformers
    5.24; from 5.25 it keeps the K/V groups (GQA). Read off the installed code, not its version."""
    import inspect

    from transformers.models.falcon import modeling_falcon

    return heads if "broadcast_to" in inspect.getsource(modeling_falcon.FalconAttention.forward) else groups


VARIANTS: dict[str, Variant] = {
    "llama": Variant("LlamaConfig", dict(intermediate_size=128), "GQA, SDPA", 2 * L + 1),
    "llama_eager": Variant("LlamaConfig", dict(intermediate_size=128), "GQA, eager matmul/softmax", 2 * L + 1,
                           attn_implementation="eager"),
    "mixtral": Variant("MixtralConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
                       "MoE (grouped_mm), renormalized top-2", 2 * L + 1, moes=L),
    "qwen3_moe": Variant("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                                num_experts_per_tok=2, head_dim=16, norm_topk_prob=False),
                         "MoE without renormalization, q/k norms", 4 * L + 1, moes=L),
    "qwen2_moe": Variant("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=48, num_experts=4,
                                                num_experts_per_tok=2),
                         "MoE + gated shared expert, qkv biases", 2 * L + 1, moes=L),
    "qwen3": Variant("Qwen3Config", dict(intermediate_size=64, head_dim=16), "q/k RMSNorm per head", 4 * L + 1),
    "glm": Variant("GlmConfig", dict(intermediate_size=64, head_dim=16), "partial (1/2) interleaved RoPE, qkv biases",
                   2 * L + 1),
    "stablelm": Variant("StableLmConfig", dict(intermediate_size=64, partial_rotary_factor=0.25),
                        "partial (1/4) rotate-half RoPE, LayerNorm", 0),
    "qwen2_sliding": Variant("Qwen2Config", dict(intermediate_size=64, use_sliding_window=True, sliding_window=5,
                                                 max_window_layers=1,
                                                 layer_types=["full_attention", "sliding_attention"]),
                             "sliding window on layer 1, qkv biases", 2 * L + 1, attention_args=[(None, None), (5, None)]),
    "gemma2": Variant("Gemma2Config", dict(intermediate_size=64, head_dim=16, sliding_window=4,
                                           attn_logit_softcapping=30.0),
                      "eager, soft-capping, alternating sliding window, (1+w) norms, GeGLU", 4 * L + 1,
                      attn_implementation="eager", attention_args=[(4, 30.0), (None, 30.0)]),
    # second wave: families that needed export patches (SSM hybrids, DBRX) or loader fixes (Falcon, Apertus)
    "falcon": Variant("FalconConfig", dict(), "multi-query fused QKV split by list indices, parallel attention, "
                      "LayerNorm", 0, kv_heads=1),
    "falcon_new_arch": Variant("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2),
                               "grouped fused QKV (list indices + broadcast), two LayerNorms", 0,
                               kv_heads=lambda: _falcon_attention_kv_heads(heads=4, groups=2)),
    "apertus": Variant("ApertusConfig", dict(intermediate_size=128, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=64, low_freq_factor=1.0,
        high_freq_factor=4.0)), "xIELU with scalar parameters, q/k norms, llama3 RoPE", 4 * L + 1),
    "dbrx": Variant("DbrxConfig", dict(d_model=64, n_heads=4, n_layers=L, max_seq_len=256, attn_config=dict(
        kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0), ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4,
                                                                          moe_top_k=2)),
                    "MoE with a data-dependent expert loop (export patch), p-norm routing, clipped fused QKV", 0,
                    moes=L, own_sizes=True),
    "jamba": Variant("JambaConfig", dict(num_hidden_layers=4, intermediate_size=64, num_experts=4,
                                         num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2,
                                         expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8),
                     "Mamba1 selective scan + attention without RoPE + MoE, dt/B/C norms", 4 * 2 + 1 + 3 * 3,
                     moes=2, attention_args=[(None, None)], ropes=0,
                     ssm_ops={"causal_conv1d": 3, "selective_scan": 3}),
    "falcon_h1": Variant("FalconH1Config", dict(intermediate_size=64, mamba_d_ssm=64, mamba_n_heads=4,
                                                mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16),
                         "Mamba2 and attention in parallel in every layer, muP multipliers", 2 * L + 1,
                         ssm_ops={"causal_conv1d": L, "ssm_scan": L}),
    "lfm2": Variant("Lfm2Config", dict(intermediate_size=64, layer_types=["conv", "full_attention"], conv_L_cache=3),
                    "short-conv layer (gated causal conv) + attention with q/k norms", 2 * L + 2 + 1,
                    attention_args=[(None, None)], ropes=1, ssm_ops={"causal_conv1d": 1}),
    "zamba2": Variant("Zamba2Config", dict(num_hidden_layers=4, num_key_value_heads=4, intermediate_size=64,
                                           mamba_d_state=8, n_mamba_heads=8, chunk_size=16,
                                           layers_block_type=["linear_attention", "hybrid"] * 2,
                                           use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True),
                      "Mamba2 + one shared (tied) attention block called twice, LoRA adapters", 4 + 2 * 2 + 1,
                      ssm_ops={"causal_conv1d": 4, "ssm_scan": 4}),
    # gpt-oss: learned sinks; MoE with clamped SwiGLU, interleaved gate/up, biases (left as graph code);
    # YaRN RoPE with an attention factor (left as graph code)
    "gpt_oss": Variant("GptOssConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                            head_dim=16, sliding_window=4),
                       "eager, attention sinks, alternating sliding window, biased clamped-SwiGLU experts", 2 * L + 1,
                       attn_implementation="eager", attention_args=[(4, None), (None, None)],
                       attention_variants=[(True, False, None)] * L, ropes=0, experts_as_graph_code=True),
    # BLOOM: ALiBi through baddbmm over [B*H, S, D] views, fused QKV, LayerNorm, untied head
    "bloom": Variant("BloomConfig", dict(num_key_value_heads=4, tie_word_embeddings=False),
                     "eager batched-matmul attention, ALiBi, fused QKV, LayerNorm", 0, attn_implementation="eager",
                     attention_variants=[(False, True, None)] * L, ropes=0),
    # Llama-4 text: chunk-local attention on RoPE layers, full attention on NoPE layers, L2 q/k norms,
    # attention temperature tuning, MoE with a shared expert (left as graph code)
    "llama4_text": Variant("Llama4TextConfig", dict(intermediate_size=64, intermediate_size_mlp=64, head_dim=16,
                                                    attention_chunk_size=4, num_local_experts=2, num_experts_per_tok=1,
                                                    no_rope_layers=[1, 0], attn_temperature_tuning=True,
                                                    floor_scale=4),
                           "chunked attention, NoPE layers, complex RoPE, L2 q/k norms, temperature tuning", 0,
                           attention_variants=[(False, False, 4), (False, False, None)], ropes=0,
                           experts_as_graph_code=True),
}


def build_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    variant = VARIANTS[name]
    common = {k: COMMON[k] for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")} \
        if variant.own_sizes else COMMON
    config = getattr(transformers, variant.config_class)(**{**common, **variant.kwargs})
    config._attn_implementation = variant.attn_implementation
    config.use_cache = False
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # larger-than-default weights spread the logits, so a wrong rewrite cannot hide in rounding
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return model


def export(model: torch.nn.Module):
    from autodeploy.export.export import export_to_gm

    return export_to_gm(model, max_batch_size=8, max_seq_len=128)


def sample_inputs(batch: int, seq: int, vocab: int = 128, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    pos = (torch.arange(seq) + offset).expand(batch, seq).contiguous()
    return ids, pos


class FakeFactory:
    """What the matchers read from ``ctx.factory``: the HF config."""

    def __init__(self, config):
        self.config = config


def export_module(module: torch.nn.Module):
    """Export a small custom ``forward(input_ids, position_ids)`` module like export_to_gm does
    (with the export patches that apply to any model, e.g. SDPA and GQA repeats as opaque ops)."""
    from torch.export import Dim

    from autodeploy.export.patches import export_patches

    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=1, max=128)
    ids, pos = sample_inputs(2, 8)
    with torch.no_grad(), export_patches(module):
        program = torch.export.export(module.eval(), (ids, pos), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                                      strict=False)
    return program.module()


def count_target(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


# the front of the default pipeline, as the tests run it
PATTERN_PIPELINE = {
    "cleanup_assertions": {"stage": "post_export"},
    "cleanup_noop_ops": {"stage": "post_export"},
    "match_attention_pattern": {"stage": "pattern_matcher"},
    "match_rope_pattern": {"stage": "pattern_matcher"},
    "match_rmsnorm_pattern": {"stage": "pattern_matcher"},
    "match_moe_pattern": {"stage": "pattern_matcher"},
    "eliminate_redundant_transposes": {"stage": "pattern_matcher"},
}


def run_pipeline(gm, config=None, transforms=None):
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    optimizer = InferenceOptimizer(transforms or PATTERN_PIPELINE)
    ctx = BuildContext(factory=FakeFactory(config) if config is not None else None)
    gm = optimizer(ctx, gm)
    return gm, {r.name: r for r in optimizer.report}
