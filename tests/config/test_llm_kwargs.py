"""LLM(model=..., **kwargs) resolves its kwargs through the same schema and precedence as the CLI."""

import pytest

from autodeploy.config import ConfigError
from autodeploy.llm import config_from_kwargs


def test_kwargs_land_in_args_and_sync_shortcuts():
    cfg = config_from_kwargs(
        "tiny_llama", world_size=2, compile_backend="torch-simple", max_batch_size=3,
        transforms={"detect_sharding": {"simple_shard_only": True}}, model_kwargs={"num_hidden_layers": 1},
    )
    assert cfg.model == "tiny_llama" and cfg.args.world_size == 2 and cfg.args.max_batch_size == 3
    transforms = cfg.args.transforms  # typed args: the transforms' options are plain dicts
    assert transforms["compile_model"]["backend"] == "torch-simple"
    assert transforms["detect_sharding"]["simple_shard_only"] is True
    assert transforms["detect_sharding"]["sharding_dims"][0] == "tp"  # siblings kept
    assert dict(cfg.args.model_kwargs) == {"num_hidden_layers": 1}


def test_card_model_selects_its_group_option():
    cfg = config_from_kwargs("llama3_8b")
    assert cfg.model == "llama3_8b" and cfg.args.skip_loading_weights is True and cfg.args.dtype == "bfloat16"


def test_path_model_goes_to_args_model(tmp_path):
    cfg = config_from_kwargs(str(tmp_path))
    assert cfg.model == cfg.args.model == str(tmp_path)


def test_yaml_extra_kwarg_is_args_level_and_below_kwargs(tmp_path):
    y = tmp_path / "ad.yaml"
    y.write_text("max_seq_len: 300\nmax_batch_size: 5\n")
    cfg = config_from_kwargs("tiny_llama", yaml_extra=[str(y)], max_batch_size=2)
    assert cfg.args.max_seq_len == 300 and cfg.args.max_batch_size == 2


def test_unknown_kwarg_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"'world_sise' \(did you mean world_size\?\)"):
        config_from_kwargs("tiny_llama", world_sise=2)


def test_unknown_transform_is_named():
    with pytest.raises(ConfigError, match="compile_modle"):
        config_from_kwargs("tiny_llama", transforms={"compile_modle": {"backend": "torch-opt"}})


def test_unknown_transform_option_is_named():
    with pytest.raises(ConfigError, match="strictt"):
        config_from_kwargs("tiny_llama", transforms={"export_to_gm": {"strictt": True}})


def test_an_empty_transforms_dict_keeps_the_pipeline():
    """``LLM(model, transforms={})`` changes nothing: kwargs are merged leaf by leaf (an empty dict
    used to replace ``args.transforms`` and leave a pipeline without export)."""
    from autodeploy.llm import config_from_kwargs

    plain = config_from_kwargs("tiny_llama")
    assert config_from_kwargs("tiny_llama", transforms={}).args.transforms == plain.args.transforms
    one = config_from_kwargs("tiny_llama", transforms={"quantize_fp8": {"on_the_fly": True}}).args.transforms
    assert one.keys() == plain.args.transforms.keys() and one["quantize_fp8"]["on_the_fly"] is True
