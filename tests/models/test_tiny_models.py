"""Tiny model builder: deterministic files, a working tokenizer and chat template, offline loading."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autodeploy.models.tiny import TINY_SPECS, build_tiny_model, ensure_tiny_model, spec_hash

TINY_NAMES = sorted(TINY_SPECS)


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name", TINY_NAMES)
def test_build_is_deterministic(name, tmp_path, tiny_dirs, monkeypatch):
    # the cached copy may come from another process (other worker, earlier run): same files
    fresh = build_tiny_model(name, tmp_path / "fresh")
    assert _digests(fresh) == _digests(tiny_dirs[name])
    key = spec_hash(name)
    assert tiny_dirs[name].name == f"{name}-{key}"
    # the cache key follows what the files depend on: a changed spec or library version is a new directory
    monkeypatch.setitem(TINY_SPECS, name, {**TINY_SPECS[name], "seed": TINY_SPECS[name]["seed"] + 1})
    assert spec_hash(name) != key
    monkeypatch.undo()
    import transformers

    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert spec_hash(name) != key


def test_parallel_first_use_builds_one_valid_copy(tmp_path):
    # two processes race to build into an empty cache; both must get the same complete directory
    env = {**os.environ, "AUTODEPLOY_CACHE": str(tmp_path)}
    code = "from autodeploy.models.tiny import ensure_tiny_model; print(ensure_tiny_model('tiny_llama'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    built = [p for p in (tmp_path / "tiny").iterdir()]
    assert [p.name for p in built] == [Path(outs[0]).name]  # no temp dirs left behind
    assert (Path(outs[0]) / "model.safetensors").exists()


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_shapes_have_the_features_under_test(name, tiny_dirs):
    config = json.loads((tiny_dirs[name] / "config.json").read_text())
    assert config["num_attention_heads"] != config["num_key_value_heads"]  # real GQA
    assert config["vocab_size"] <= 1000 and config["hidden_size"] <= 128
    if name == "tiny_mixtral":
        assert config["num_experts_per_tok"] > 1 and config["num_local_experts"] > config["num_experts_per_tok"]
    if name == "tiny_hybrid":
        kinds = set(config["layers_block_type"])
        assert {"linear_attention", "full_attention", "mlp"} <= kinds


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tokenizer_round_trip_and_specials(name, tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dirs[name]))
    assert json.loads((tiny_dirs[name] / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    config = json.loads((tiny_dirs[name] / "config.json").read_text())
    assert len(tok) <= config["vocab_size"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for text in ["Hello, world!", "The model shards its weights over 2 ranks.", "ünïcödé 🙂 \t tabs\nnew line",
                 "never seen: qzxv 31415926"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # a trained vocabulary merges common words into few tokens
    assert len(tok("the model and the weights").input_ids) < len("the model and the weights") / 2


@pytest.mark.parametrize("name", TINY_NAMES)
def test_chat_template(name, tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dirs[name]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|begin|><|system|>Be brief.<|end|><|user|>hi there<|end|><|assistant|>"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_prompt.endswith("<|end|>")


@pytest.mark.parametrize("name", TINY_NAMES)
def test_from_pretrained_offline(name, tiny_dirs, hf_models):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = hf_models[name]
    assert type(model).__name__ == json.loads((tiny_dirs[name] / "config.json").read_text())["architectures"][0]
    assert model.dtype == torch.float32
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # random weights with a wide init: the next-token choice is not flat
    assert logits[0, -1].std() > 0.05


def test_cli_builds_into_directory(tmp_path):
    out = tmp_path / "llama"
    subprocess.run([sys.executable, "-m", "autodeploy.models.tiny", "--family", "llama", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert _digests(out) == _digests(ensure_tiny_model("tiny_llama"))
    bad = subprocess.run([sys.executable, "-m", "autodeploy.models.tiny", "--family", "llama", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not empty" in bad.stderr


def test_unknown_tiny_name():
    with pytest.raises(ValueError, match="unknown tiny model 'tiny_gpt'.*tiny_llama"):
        ensure_tiny_model("tiny_gpt")
