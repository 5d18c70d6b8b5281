"""ModelFactory: resolving model names, config overrides, dtype, tokenizer, clear errors."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from autodeploy.config.schema import AutoDeployArgs
from autodeploy.models.factory import (
    FACTORIES,
    ModelFactory,
    ModelResolutionError,
    apply_config_overrides,
    create_factory,
    get_factory_class,
)


def test_registry_and_create_from_args():
    assert "AutoModelForCausalLM" in FACTORIES
    factory = create_factory(AutoDeployArgs(model="tiny_llama", model_factory="AutoModelForCausalLM", max_seq_len=64))
    assert isinstance(factory, ModelFactory) and factory.max_seq_len == 64
    with pytest.raises(ValueError, match=r"unknown args.model_factory 'AutoModelForCausalLm'.*did you mean AutoModelForCausalLM"):
        get_factory_class("AutoModelForCausalLm")
    with pytest.raises(ValueError, match=r"known: AutoModelForCausalLM"):
        create_factory(AutoDeployArgs(model="tiny_llama", model_factory="Nope"))


def test_from_args_typed_args_and_model_override():
    args = AutoDeployArgs(model=None, model_kwargs={"num_hidden_layers": 1}, dtype="bfloat16")
    factory = ModelFactory.from_args(args, model="tiny_llama")
    assert factory.config.num_hidden_layers == 1 and factory.dtype == torch.bfloat16


def test_local_directory(tiny_dirs):
    factory = ModelFactory(str(tiny_dirs["tiny_llama"]))
    assert factory.source.kind == "dir"
    assert factory.checkpoint_dir() == tiny_dirs["tiny_llama"]
    assert factory.model_class_name == "LlamaForCausalLM"


@pytest.mark.parametrize("name,cls", [("tiny_llama", "LlamaForCausalLM"), ("tiny_mixtral", "MixtralForCausalLM"),
                                      ("tiny_hybrid", "NemotronHForCausalLM")])
def test_tiny_card_builds_on_meta(name, cls, tiny_dirs):
    factory = ModelFactory(name)
    assert factory.source.kind == "tiny" and factory.source.local_dir == tiny_dirs[name]
    model = factory.build_model()
    assert type(model).__name__ == cls == factory.model_class_name
    assert not model.training and model.config.use_cache is False
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("card,shape", [
    ("llama3_8b", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256)),
    ("llama3_70b", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=128256)),
    ("mixtral_8x7b", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=14336, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)),
])
def test_shape_cards(card, shape):
    factory = ModelFactory(card)
    assert factory.source.kind == "card"
    assert {k: getattr(factory.config, k) for k in shape} == shape
    assert factory.dtype == torch.bfloat16  # "auto" -> the card's dtype
    assert factory.init_tokenizer() is None
    assert factory.checkpoint_dir() is None
    if card.startswith("llama3"):
        rope = factory.config.rope_parameters
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 500000.0


def test_llama3_8b_card_on_meta_has_real_rope_buffers():
    # the non-persistent RoPE buffer is computed for real even though the model lives on meta
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    factory = ModelFactory("llama3_8b")
    model = factory.build_model("meta")
    n_params = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < n_params < 8.1e9
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.device("cpu"):
        expected = LlamaRotaryEmbedding(factory.config).inv_freq
    recorded = factory._record().buffer_values["model.rotary_emb.inv_freq"]
    assert torch.equal(recorded, expected)


def test_model_kwargs_override_top_level_and_nested():
    factory = ModelFactory("tiny_llama", model_kwargs={"num_hidden_layers": 1, "rope_parameters": {"rope_theta": 20000.0}})
    assert factory.config.num_hidden_layers == 1
    assert factory.config.rope_parameters["rope_theta"] == 20000.0
    assert factory.config.rope_parameters["rope_type"] == "default"  # sibling keys kept
    model = factory.build_model()
    assert len(model.model.layers) == 1


def test_fewer_layers_shortens_per_layer_lists_and_rope_theta_alias():
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3")
    apply_config_overrides(config, {"num_hidden_layers": 3, "rope_theta": 12345.0})
    assert config.num_hidden_layers == 3 and len(config.layer_types) == 3
    assert config.rope_parameters["rope_theta"] == 12345.0


def test_model_kwargs_override_sub_config():
    from transformers import AutoConfig

    config = AutoConfig.for_model("llava")
    layers = config.text_config.num_hidden_layers
    apply_config_overrides(config, {"text_config": {"hidden_size": 128}})
    assert config.text_config.hidden_size == 128
    assert config.text_config.num_hidden_layers == layers
    with pytest.raises(ValueError, match=r"model_kwargs.text_config.hiden_size.*did you mean hidden_size"):
        apply_config_overrides(config, {"text_config": {"hiden_size": 1}})


def test_model_kwargs_unknown_and_derived_fields_fail():
    with pytest.raises(ValueError, match=r"unknown config field.*LlamaConfig.*num_hiden_layers.*did you mean num_hidden_layers"):
        ModelFactory("tiny_llama", model_kwargs={"num_hiden_layers": 1})
    # NemotronH derives the layer count from its layer pattern
    with pytest.raises(ValueError, match=r"num_hidden_layers=2 has no effect on NemotronHConfig"):
        ModelFactory("tiny_hybrid", model_kwargs={"num_hidden_layers": 2})


def test_model_kwargs_build_options():
    factory = ModelFactory("tiny_mixtral", model_kwargs={"attn_implementation": "eager",
                                                          "experts_implementation": "batched_mm"})
    model = factory.build_model()
    assert model.config._attn_implementation == "eager"
    assert model.config._experts_implementation == "batched_mm"


@pytest.mark.parametrize("dtype,expected", [("auto", torch.float32), ("float32", torch.float32),
                                            ("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype(dtype, expected):
    factory = ModelFactory("tiny_llama", dtype=dtype)
    assert factory.dtype == expected
    assert {p.dtype for p in factory.build_model().parameters()} == {expected}


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        ModelFactory("tiny_llama", dtype="float8")


def test_bad_model_names(tmp_path):
    # tests run with HF_HUB_OFFLINE=1 (tests/conftest.py): an uncached hub id fails at once
    t0 = time.perf_counter()
    with pytest.raises(ModelResolutionError, match=r"'no-such-org/no-such-model' is not a card \(.*tiny_llama.*llama3_8b.*"
                       r"nor a local directory, and HF_HUB_OFFLINE=1 with no cached copy"):
        ModelFactory("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 2
    with pytest.raises(ModelResolutionError, match=r"unknown model 'tiny-llama': did you mean tiny_llama\?"):
        ModelFactory("tiny-llama")
    with pytest.raises(ModelResolutionError, match=r"did you mean llama3_8b\?"):
        ModelFactory("llama3-8b")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelResolutionError, match="is a file, not a directory"):
        ModelFactory(str(tmp_path / "config.json"))
    with pytest.raises(ModelResolutionError, match="does not exist"):
        ModelFactory(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolutionError, match="has no config.json"):
        ModelFactory(str(tmp_path / "empty"))
    with pytest.raises(ModelResolutionError, match="no model given"):
        ModelFactory("")


def test_tokenizer_from_dir_with_kwargs_and_override(tiny_dirs, tmp_path):
    tok = ModelFactory("tiny_llama").init_tokenizer()
    assert tok.padding_side == "left" and tok("hi").input_ids[0] == tok.bos_token_id
    tok = ModelFactory("tiny_llama", tokenizer_kwargs={"padding_side": "right"}).init_tokenizer()
    assert tok.padding_side == "right"
    # args.tokenizer names another source; here a copy of the tokenizer files only
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_dirs["tiny_mixtral"] / f, tok_dir / f)
    tok = ModelFactory("llama3_8b", tokenizer=str(tok_dir)).init_tokenizer()
    assert tok is not None and tok.decode(tok("round trip").input_ids, skip_special_tokens=True) == "round trip"


def test_hub_ids_take_the_ordinary_path_or_the_local_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from autodeploy.models import factory as factory_mod

    # the hub reachable: a hub id goes through the ordinary HF loading path
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(factory_mod, "hub_reachable", lambda: True)
    assert factory_mod.resolve_model("some-org/some-model") == factory_mod.ModelSource("hub", "some-org/some-model",
                                                                                       "some-org/some-model")
    # unreachable (or offline): the copy in the HF cache, as offline transformers would load it
    snapshot = tmp_path / "models--some-org--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--some-org--some-model" / "refs").mkdir()
    (tmp_path / "models--some-org--some-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(factory_mod, "hub_reachable", lambda: False)
    source = factory_mod.resolve_model("some-org/some-model")
    assert source.kind == "dir" and source.local_dir == snapshot
    with pytest.raises(ModelResolutionError, match=r"the hub \(https://.*\) is unreachable with no cached copy"):
        factory_mod.resolve_model("some-org/other-model")


def test_hub_probe_fails_fast_without_retries(monkeypatch):
    from autodeploy.models import factory as factory_mod

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(factory_mod, "_hub_endpoint", lambda: "https://hub.invalid")  # never resolves
    factory_mod.hub_reachable.cache_clear()
    t0 = time.perf_counter()
    assert factory_mod.hub_reachable() is False
    assert time.perf_counter() - t0 < 5
    factory_mod.hub_reachable.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # behind a proxy we cannot tell: assume yes
    assert factory_mod.hub_reachable() is True
    factory_mod.hub_reachable.cache_clear()
