"""FP8 end to end on the CPU: the default pipeline on small FP8 checkpoints (HF ``quant_method: fp8``
per tensor and in blocks, ModelOpt FP8) and on 16-bit checkpoints quantized on the fly, against HF
with the dequantized weights: cached prefill logits and greedy tokens. Prompts run past the KV page
(8), the MoE dense/grouped switch (64 tokens) and the step's token budget (chunked prefill)."""

from __future__ import annotations

import json

import pytest
import torch

from fp8_checkpoints import write_fp8_checkpoint

from autodeploy.config import ConfigError, experiment

PROMPT_LENGTHS = (70, 5, 1, 23)
MAX_NUM_TOKENS = 80

VARIANTS = {
    "llama_hf_tensor": ("tiny_llama", dict(fmt="hf")),
    "llama_modelopt": ("tiny_llama", dict(fmt="modelopt")),
    "mixtral_hf_blocks_static": ("tiny_mixtral", dict(fmt="hf", block=(32, 32), static=True)),
    "mixtral_modelopt": ("tiny_mixtral", dict(fmt="modelopt", exclude=("lm_head", "gate"))),
    "llama_on_the_fly": ("tiny_llama", None),
    "mixtral_on_the_fly": ("tiny_mixtral", None),
}


def _compose(model_dir, *extra):
    from autodeploy.config import compose_experiment

    return compose_experiment([
        f"model={model_dir}", "args.device=cpu", "args.dtype=float32", "args.skip_tokenizer_init=true",
        "args.max_batch_size=4", "args.max_seq_len=128", "args.attn_page_size=8",
        f"args.max_num_tokens={MAX_NUM_TOKENS}", "args.transforms.gather_last_token_logits.enabled=false", *extra,
    ])


def _dequantize_per_channel(hf, exclude=("lm_head", ".gate")):
    """HF reference of on-the-fly FP8: each linear's (and expert's) weight rounded per output row,
    with plain torch code (amax / 448 per row, e4m3 cast)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            module = name.rpartition(".")[0]
            is_linear = name.endswith(".weight") and p.dim() == 2 and "embed" not in name
            is_expert = ".experts." in name and p.dim() == 3
            if (is_linear and not any(module.endswith(e) for e in exclude)) or is_expert:
                scale = p.abs().amax(dim=-1, keepdim=True) / 448
                p.copy_((p / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale)


class Built:
    def __init__(self, name: str, tmp):
        from transformers import AutoModelForCausalLM

        from autodeploy.build import build_engine
        from autodeploy.models.tiny import ensure_tiny_model

        model, fp8 = VARIANTS[name]
        src = ensure_tiny_model(model)
        if fp8 is None:
            cfg = _compose(src, "args.transforms.quantize_fp8.on_the_fly=true")
            self.hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
            _dequantize_per_channel(self.hf)
        else:
            ref = write_fp8_checkpoint(src, tmp / name, **fp8)
            cfg = _compose(tmp / name)
            self.hf = AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32)
        self.hf.eval()
        self.built = build_engine(experiment(cfg).args, progress=False)
        self.engine = self.built.engine
        gen = torch.Generator().manual_seed(3)
        self.prompts = [torch.randint(3, self.hf.config.vocab_size, (n,), generator=gen).tolist()
                        for n in PROMPT_LENGTHS]

    def rows(self):
        return {r["name"]: r for r in self.built.report}


@pytest.fixture(scope="module", params=list(VARIANTS))
def built(request, tmp_path_factory):
    return Built(request.param, tmp_path_factory.mktemp("fp8"))


def _graph_ops(engine) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in engine.model.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("autodeploy."):
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def test_linears_and_experts_are_fp8_and_fused(built):
    rows = built.rows()
    moe = "mixtral" in rows["build_model"]["note"].lower()
    note = rows["quantize_fp8"]["note"]
    # tiny models: 2 layers of q/k/v/o (+ gate/up/down, or a router: 16-bit on the fly and in the modelopt variant)
    if moe:
        assert "2 MoE expert pairs in fp8" in note, note
    ops = _graph_ops(built.engine)
    assert ops.get("autodeploy.fp8_linear.default", 0) >= 4, ops
    assert ops.get("autodeploy.fp8_moe.default", 0) == (2 if moe else 0), ops
    assert "autodeploy.moe.default" not in ops
    assert "lm_head" in note.partition("16-bit: ")[2], note
    assert rows["fuse_parallel_linears"]["num_matches"] >= 2  # q/k/v of both layers, fp8 included
    fp8_params = [n for n, p in built.engine.model.named_parameters() if p.dtype == torch.float8_e4m3fn]
    assert any("fused_q_proj_k_proj_v_proj" in n for n in fp8_params), fp8_params
    assert not any("embed_tokens" in n or "lm_head" in n for n in fp8_params)


def test_cached_prefill_logits_equal_hf_with_dequantized_weights(built):
    cache, engine = built.engine.cache, built.engine
    prompts = built.prompts[1:]  # 5 + 1 + 23 tokens in one flattened step
    pages = [cache.allocate_pages(cache.pages_needed(len(p))) for p in prompts]
    slots = [cache.allocate_slot() for _ in prompts]
    try:
        inputs = cache.info.build(prompts, [0] * len(prompts), pages, slots)
        logits = engine.forward(inputs)  # the engine passes the inputs the graph takes
    finally:
        for p in pages:
            cache.free_pages(p)
        for s in slots:
            cache.free_slot(s)
    offset = 0
    for prompt in prompts:
        with torch.no_grad():
            expected = built.hf(input_ids=torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits[0, offset:offset + len(prompt)], expected, rtol=0, atol=2e-5)
        offset += len(prompt)


def test_greedy_generation_equals_hf_generate(built):
    from autodeploy.runtime.sampling_params import SamplingParams

    outs = built.engine.generate(built.prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                 progress=False)
    assert [o.error for o in outs] == [None] * len(outs)
    for prompt, out in zip(built.prompts, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = built.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref, f"prompt of {len(prompt)} tokens"


def _load_ranks(model_dir):
    from autodeploy.models.factory import create_factory
    from autodeploy.transforms.interface import BuildContext, Stage
    from autodeploy.transforms.optimizer import InferenceOptimizer

    args = experiment(_compose(model_dir, "args.world_size=2")).args
    transforms = {k: v for k, v in args.transforms.items() if Stage.parse(v["stage"]) <= Stage.WEIGHT_LOAD}
    for rank in (0, 1):
        ctx = BuildContext(args=args, factory=create_factory(args), device=torch.device("cpu"), dtype=torch.float32,
                           rank=rank, world_size=2)
        yield rank, InferenceOptimizer(transforms)(ctx)


def test_block_scales_that_a_rank_would_split_fail_naming_the_weight(tmp_path):
    from autodeploy.models.tiny import ensure_tiny_model
    from autodeploy.transforms.interface import TransformError

    # k_proj has 32 rows: two ranks take 16 each, half a block of 32
    write_fp8_checkpoint(ensure_tiny_model("tiny_llama"), tmp_path / "ckpt", "hf", block=(32, 32))
    with pytest.raises(TransformError, match=r"k_proj.weight: the rank's slice \[0, 16\) of dim 0 does not fall on "
                                             r"the fp8 scale blocks of 32"):
        list(_load_ranks(tmp_path / "ckpt"))


@pytest.mark.parametrize("block", [None, (16, 16)])
def test_each_rank_loads_its_slice_of_weights_and_scales(tmp_path, block):
    # tensor parallelism on meta, then the loader: every rank's dequantized fp8 weight is its slice
    # of the full one (column splits for q/k/v and gate/up, row splits for o/down)
    from autodeploy.custom_ops.fp8_linear import dequantize
    from autodeploy.models.tiny import ensure_tiny_model

    write_fp8_checkpoint(ensure_tiny_model("tiny_llama"), tmp_path / "ckpt", "hf", block=block)
    weights = {}
    for rank, gm in _load_ranks(tmp_path / "ckpt"):
        for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            mod = gm.get_submodule(module)
            assert mod.weight.dtype == torch.float8_e4m3fn
            weights[(module, rank)] = dequantize(mod.weight, mod.weight_scale, block)
    from safetensors.torch import load_file

    from autodeploy.models.quantized import canonical_scale

    full = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for module, dim in (("model.layers.0.self_attn.q_proj", 0), ("model.layers.1.mlp.down_proj", 1)):
        q = full[f"{module}.weight"]
        whole = dequantize(q, canonical_scale(full[f"{module}.weight_scale_inv"], *q.shape, block, module), block)
        assert torch.equal(torch.cat([weights[(module, 0)], weights[(module, 1)]], dim=dim), whole), module


def test_unsupported_quantization_fails_before_model_work(tmp_path):
    from autodeploy.config import preflight
    from autodeploy.models.tiny import ensure_tiny_model

    write_fp8_checkpoint(ensure_tiny_model("tiny_llama"), tmp_path / "awq", "hf")
    config = json.loads((tmp_path / "awq" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "awq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"quant_method='awq'.*supported are fp8"):
        preflight(_compose(tmp_path / "awq"))
    write_fp8_checkpoint(ensure_tiny_model("tiny_llama"), tmp_path / "nvfp4", "modelopt")
    (tmp_path / "nvfp4" / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    with pytest.raises(ConfigError, match=r"quant_algo='NVFP4': only FP8"):
        preflight(_compose(tmp_path / "nvfp4"))


def test_scale_layouts_and_slices():
    from autodeploy.models.quantized import canonical_scale, scale_slices

    # one value per tensor, or per row group (gate|up stored with a scale each), becomes per channel
    assert canonical_scale(torch.tensor(0.5), 4, 8, None, "w").tolist() == [0.5] * 4
    assert canonical_scale(torch.tensor([[1.0], [2.0]]), 4, 8, None, "w").tolist() == [1.0, 1.0, 2.0, 2.0]
    assert canonical_scale(torch.ones(2, 1), 4, 8, (2, 8), "w").shape == (2, 1)
    with pytest.raises(ConfigError, match="3 scale values do not divide the weight's 4 rows"):
        canonical_scale(torch.ones(3), 4, 8, None, "w")
    # rows carry over, a split of K leaves per-channel scales whole and divides block scales
    assert scale_slices((0, 2, 4), 2, None, [4, 8], "w") == [(0, 2, 4)]
    assert scale_slices((1, 0, 4), 2, None, [4, 8], "w") is None
    assert scale_slices([(0, 1, 2), (1, 0, 4)], 3, None, [3, 4, 8], "experts") == [(0, 1, 2), (1, 0, 4)]
    assert scale_slices((1, 4, 8), 2, (2, 4), [4, 8], "w") == [(1, 1, 2)]
    assert scale_slices((0, 4, 6), 2, (4, 4), [6, 8], "w") == [(0, 1, 2)]  # the last, partial block
    with pytest.raises(ConfigError, match=r"w: the rank's slice \[2, 4\) of dim 0 does not fall"):
        scale_slices((0, 2, 4), 2, (4, 4), [8, 8], "w")
