"""Streaming weight loading: equals from_pretrained, slices, tied weights, random init, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from autodeploy.models.checkpoint import CheckpointError, SafetensorsCheckpoint, UnsupportedCheckpointLayout
from autodeploy.models.factory import ModelFactory
from autodeploy.models.materialize import set_tensor

TINY_NAMES = ["tiny_llama", "tiny_mixtral", "tiny_hybrid"]


def _loaded(name_or_dir, **kwargs):
    factory = ModelFactory(str(name_or_dir), **kwargs)
    model = factory.build_model("meta")
    factory.load_weights(model, "cpu")
    return factory, model


@pytest.mark.parametrize("name", TINY_NAMES)
def test_streaming_load_equals_from_pretrained(name, hf_models):
    _, model = _loaded(name)
    ref = hf_models[name]
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    # non-persistent buffers (RoPE inv_freq) are real values, equal to HF's
    ref_buffers = dict(ref.named_buffers())
    for key, buf in model.named_buffers():
        assert buf.device.type == "cpu" and torch.equal(buf, ref_buffers[key]), key
    ids = torch.tensor([[5, 9, 200, 17, 3, 3, 41]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, ref(input_ids=ids, use_cache=False).logits)


def test_checkpoint_layouts_are_converted(tiny_dirs):
    # transformers 5 saves Mixtral experts one per expert and NemotronH under "backbone."
    mixtral_keys = load_file(str(tiny_dirs["tiny_mixtral"] / "model.safetensors")).keys()
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in mixtral_keys
    hybrid_keys = load_file(str(tiny_dirs["tiny_hybrid"] / "model.safetensors")).keys()
    assert all(k.startswith(("backbone.", "lm_head.")) for k in hybrid_keys)


def _checkpoint(factory) -> SafetensorsCheckpoint:
    record = factory._record()
    return SafetensorsCheckpoint(factory.checkpoint_dir(), record.conversions, record.base_model_prefix)


@pytest.mark.parametrize("key,spec", [
    ("model.layers.0.self_attn.q_proj.weight", (0, 16, 48)),
    ("model.layers.0.self_attn.o_proj.weight", (1, 0, 32)),
    ("model.layers.1.mlp.experts.gate_up_proj", (0, 1, 3)),      # expert parallel: experts 1..2
    ("model.layers.1.mlp.experts.gate_up_proj", (1, 80, 120)),   # crosses the gate|up boundary (96)
    ("model.layers.1.mlp.experts.gate_up_proj", [(1, 0, 48), (1, 96, 144)]),  # a rank's gate and up halves
    ("model.layers.0.mlp.experts.down_proj", (2, 48, 96)),
    ("model.layers.0.mlp.experts.down_proj", (-1, 0, 8)),
    ("model.embed_tokens.weight", (0, 256, 512)),
    # expert x tensor parallel: a rank's experts, and within them its rows of gate and of up
    ("model.layers.1.mlp.experts.gate_up_proj", [(0, 1, 3), (1, 0, 48), (1, 96, 144)]),
    ("model.layers.0.mlp.experts.down_proj", [(0, 2, 4), (2, 48, 96)]),
    ("model.layers.0.self_attn.q_proj.weight", [(0, 0, 16), (0, 32, 48), (1, 8, 40)]),
])
def test_slice_reads_equal_the_full_tensor_sliced(key, spec, hf_models):
    factory = ModelFactory("tiny_mixtral")
    ckpt = _checkpoint(factory)
    full = hf_models["tiny_mixtral"].state_dict()[key]
    assert ckpt.shape(key) == list(full.shape)
    assert torch.equal(ckpt.read(key), full)
    ranges = [spec] if isinstance(spec, tuple) else spec
    expected = full
    for dim in sorted({d % full.dim() for d, _, _ in ranges}):  # ranges of one dim concatenate; dims combine
        index = torch.cat([torch.arange(s, e) for d, s, e in ranges if d % full.dim() == dim])
        expected = expected.index_select(dim, index)
    assert torch.equal(ckpt.read(key, spec), expected)


def test_fused_slice_reads_only_the_needed_experts(monkeypatch):
    factory = ModelFactory("tiny_mixtral")
    ckpt = _checkpoint(factory)
    opened = []
    original = ckpt._open
    monkeypatch.setattr(ckpt, "_open", lambda key: opened.append(key) or original(key))
    ckpt.read("model.layers.0.mlp.experts.down_proj", (0, 2, 3))
    read_keys = {k for k in opened if ".w2." in k}
    assert read_keys == {"model.layers.0.block_sparse_moe.experts.2.w2.weight",
                         "model.layers.0.block_sparse_moe.experts.0.w2.weight"}  # expert 0 only for the shape


def test_load_weights_with_slices_into_sharded_shapes(hf_models):
    # what sharding does before weight_load: shrink the meta tensors, name the slice per FQN
    factory = ModelFactory("tiny_mixtral")
    model = factory.build_model("meta")
    slices = {
        "model.layers.0.self_attn.q_proj.weight": (0, 32, 64),
        "model.layers.0.mlp.experts.gate_up_proj": [(1, 48, 96), (1, 144, 192)],
        "model.layers.0.mlp.experts.down_proj": (2, 48, 96),
    }
    for fqn, spec in slices.items():
        full = dict(model.named_parameters())[fqn]
        ranges = [spec] if isinstance(spec, tuple) else spec
        shape = list(full.shape)
        shape[ranges[0][0]] = sum(e - s for _, s, e in ranges)
        set_tensor(model, fqn, torch.empty(shape, dtype=full.dtype, device="meta"), is_param=True)
    factory.load_weights(model, "cpu", slices=slices)
    ref = hf_models["tiny_mixtral"].state_dict()
    params = dict(model.named_parameters())
    assert torch.equal(params["model.layers.0.self_attn.q_proj.weight"], ref["model.layers.0.self_attn.q_proj.weight"][32:64])
    gate_up = ref["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(params["model.layers.0.mlp.experts.gate_up_proj"],
                       torch.cat([gate_up[:, 48:96], gate_up[:, 144:192]], dim=1))
    assert torch.equal(params["model.layers.0.mlp.experts.down_proj"], ref["model.layers.0.mlp.experts.down_proj"][..., 48:96])
    assert torch.equal(params["model.layers.1.self_attn.q_proj.weight"], ref["model.layers.1.self_attn.q_proj.weight"])


def test_slice_with_unsharded_model_shape_is_a_clear_error():
    factory = ModelFactory("tiny_llama")
    model = factory.build_model("meta")
    with pytest.raises(CheckpointError, match=r"q_proj.weight: loaded shape \[32, 64\].*!= model shape \[64, 64\].*per-rank shape"):
        factory.load_weights(model, "cpu", slices={"model.layers.0.self_attn.q_proj.weight": (0, 0, 32)})


def test_tied_checkpoint_without_lm_head(tiny_dirs, tmp_path):
    # a tied model's checkpoint stores only the embedding; lm_head must come from its tied alias
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(tiny_dirs["tiny_llama"]))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dirs["tiny_llama"] / f, tmp_path / f)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    _, model = _loaded(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_sharded_checkpoint_with_index(tiny_dirs, tmp_path, hf_models):
    hf_models["tiny_llama"].save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _, model = _loaded(tmp_path)
    for key, value in hf_models["tiny_llama"].state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_missing_checkpoint_files_and_keys(tiny_dirs, tmp_path):
    src = tiny_dirs["tiny_llama"]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(src / "config.json", no_weights / "config.json")
    factory = ModelFactory(str(no_weights))
    with pytest.raises(CheckpointError, match=f"no safetensors checkpoint.*in {no_weights}"):
        factory.load_weights(factory.build_model(), "cpu")

    # an index that names a shard that is not there
    broken = tmp_path / "broken_index"
    shutil.copytree(src, broken)
    keys = list(load_file(str(src / "model.safetensors")))
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    factory = ModelFactory(str(broken))
    with pytest.raises(CheckpointError, match=r"missing: .*model-00002-of-00002.safetensors"):
        factory.load_weights(factory.build_model(), "cpu")

    # a key the model needs is not in the checkpoint
    missing_key = tmp_path / "missing_key"
    shutil.copytree(src, missing_key)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(missing_key / "model.safetensors"), metadata={"format": "pt"})
    factory = ModelFactory(str(missing_key))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.down_proj.weight' not found in checkpoint .*missing_key"):
        factory.load_weights(factory.build_model(), "cpu")


def test_shape_card_without_weights_needs_skip_loading():
    factory = ModelFactory("llama3_8b", model_kwargs={"num_hidden_layers": 1, "vocab_size": 256})
    with pytest.raises(CheckpointError, match="shape card without weights; set skip_loading_weights=true"):
        factory.load_weights(factory.build_model(), "cpu")


def test_unsupported_layout_is_named(tmp_path):
    from transformers.core_model_loading import Chunk, WeightConverter

    # a converter that splits a fused qkv: not something the streaming loader reassembles
    converter = WeightConverter("self_attn.qkv_proj.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                               "self_attn.v_proj.weight"], operations=[Chunk(dim=0)])
    save_file({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(128, 64)}, str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path, [converter])
    for name in ("q_proj", "v_proj"):
        with pytest.raises(UnsupportedCheckpointLayout, match=rf"model.layers.0.self_attn.{name}.weight.*qkv_proj.*Chunk"):
            ckpt.read(f"model.layers.0.self_attn.{name}.weight")


def test_random_init_is_deterministic_hf_like_and_slice_consistent():
    factory = ModelFactory("tiny_hybrid", skip_loading_weights=True)
    a = factory.load_weights(factory.build_model(), "cpu").state_dict()
    b = factory.load_weights(factory.build_model(), "cpu").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    w = a["model.layers.0.mixer.in_proj.weight"]
    assert abs(w.std().item() - factory.config.initializer_range) < 0.01 and abs(w.mean().item()) < 0.01
    assert torch.equal(a["model.layers.0.norm.weight"], torch.ones_like(a["model.layers.0.norm.weight"]))
    assert torch.equal(a["model.layers.0.mixer.D"], torch.ones(8))
    assert torch.allclose(a["model.layers.0.mixer.A_log"], torch.log(torch.arange(1, 9, dtype=torch.float32)))
    assert torch.equal(a["model.layers.0.mixer.conv1d.bias"], torch.zeros_like(a["model.layers.0.mixer.conv1d.bias"]))
    assert not torch.equal(w, a["model.layers.3.mixer.in_proj.weight"])  # each tensor draws its own values
    # a rank's slice is the slice of the full random tensor
    model = factory.build_model()
    fqn = "model.layers.0.mixer.in_proj.weight"
    set_tensor(model, fqn, torch.empty(100, 64, device="meta"), is_param=True)
    factory.load_weights(model, "cpu", slices={fqn: (0, 50, 150)})
    assert torch.equal(dict(model.named_parameters())[fqn], w[50:150])


def test_random_init_of_a_shape_card_in_bf16():
    factory = ModelFactory("llama3_8b", skip_loading_weights=True,
                           model_kwargs={"num_hidden_layers": 1, "vocab_size": 1024, "hidden_size": 256,
                                         "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                                         "head_dim": 64})
    model = factory.load_weights(factory.build_model(), "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False).logits
    assert torch.isfinite(logits).all()


def test_load_weights_transform_reads_shard_slices_from_ctx(hf_models):
    from autodeploy.transforms.interface import BuildContext, build_config, get_transform_class

    factory = ModelFactory("tiny_llama")
    model = factory.build_model("meta")
    fqn = "model.layers.1.mlp.up_proj.weight"
    set_tensor(model, fqn, torch.empty(64, 64, device="meta"), is_param=True)
    ctx = BuildContext(factory=factory, device=torch.device("cpu"), shared={"shard_slices": {fqn: (0, 64, 128)}})
    transform = get_transform_class("load_weights")(build_config("load_weights", {"stage": "weight_load"}))
    model, info = transform.apply(model, ctx)
    assert info.num_matches == 1 and "1 sliced" in info.note
    assert torch.equal(dict(model.named_parameters())[fqn], hf_models["tiny_llama"].state_dict()[fqn][64:128])
