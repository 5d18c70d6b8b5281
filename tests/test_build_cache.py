"""The build cache (autodeploy/build_cache.py): a second build of the same model and config starts
at weight_load with the cached graph (and the factory's record: no HF model is built) and generates
the same tokens; a changed config, model or source hash misses; ``AUTODEPLOY_BUILD_CACHE=0`` writes nothing."""

from __future__ import annotations

import shutil

import pytest
import torch

from autodeploy import build_cache
from autodeploy.runtime.sampling_params import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10] * 6, [11, 12, 13]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _build(model: str = "tiny_llama", *extra: str):
    from autodeploy.build import build_engine
    from autodeploy.config import compose_experiment, experiment

    cfg = compose_experiment([f"model={model}", "args.device=cpu", "args.max_batch_size=4", "args.max_seq_len=96",
                              "args.skip_tokenizer_init=true", *extra])
    built = build_engine(experiment(cfg).args, progress=False)
    assert built.engine.vocab_size == built.factory.config.vocab_size  # the factory tells the engine
    rows = {r["name"]: r for r in built.report}
    tokens = [o.token_ids for o in built.engine.generate(PROMPTS, GREEDY, progress=False)]
    return rows, tokens


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODEPLOY_BUILD_CACHE", str(tmp_path / "build"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # placed by the user: kept
    return tmp_path / "build"


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_mixtral"])
def test_same_config_twice_hits_and_generates_the_same(cache, model, monkeypatch):
    first, tokens = _build(model)
    assert first["build_cache"]["note"].startswith("miss") and first["build_cache"]["num_matches"] == 1
    assert first["export_to_gm"]["time_s"] > 0
    entries = [p for p in cache.iterdir() if p.is_dir() and p.name != "torch"]
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"graph.pkl", "state.pkl", "inputs.json"}

    from autodeploy.models.factory import ModelFactory

    def no_hf_model(*args, **kwargs):
        raise AssertionError("a hit builds no HF model: the entry holds the factory's record")

    monkeypatch.setattr(ModelFactory, "build_model", no_hf_model)
    second, again = _build(model)
    assert second["build_cache"]["note"].startswith("hit"), second["build_cache"]
    for name in ("build_model", "export_to_gm", "match_attention_pattern", "detect_sharding"):
        assert second[name]["time_s"] == 0 and "from the build cache" in second[name]["note"], second[name]
        assert second[name]["num_matches"] == first[name]["num_matches"]
    assert second["load_weights"]["num_matches"] == 1 and second["compile_model"]["error"] is None
    assert again == tokens


def test_a_changed_config_or_source_misses(cache, monkeypatch):
    rows, tokens = _build()
    assert rows["build_cache"]["note"].startswith("miss")
    rows, _ = _build("tiny_llama", "args.max_seq_len=80")
    assert rows["build_cache"]["note"].startswith("miss")
    rows, _ = _build("tiny_llama", "args.transforms.match_rope_pattern.enabled=false")
    assert rows["build_cache"]["note"].startswith("miss")
    monkeypatch.setattr(build_cache, "source_hash", lambda: "another version of the code")
    rows, again = _build()
    assert rows["build_cache"]["note"].startswith("miss") and again == tokens
    monkeypatch.undo()
    monkeypatch.setenv("AUTODEPLOY_BUILD_CACHE", str(cache))
    rows, _ = _build()
    assert rows["build_cache"]["note"].startswith("hit")


def test_source_hash_follows_every_python_file(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(build_cache.PACKAGE_DIR / "runtime", root)
    before = build_cache.source_hash.__wrapped__(root)
    assert build_cache.source_hash.__wrapped__(root) == before
    (root / "engine.py").write_text((root / "engine.py").read_text() + "\n# a comment\n")
    assert build_cache.source_hash.__wrapped__(root) != before
    assert build_cache.source_hash() == build_cache.source_hash.__wrapped__(build_cache.PACKAGE_DIR)


def test_a_changed_checkpoint_misses(cache, tmp_path):
    from autodeploy.models.tiny import ensure_tiny_model

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny_model("tiny_llama"), model)
    assert _build(str(model))[0]["build_cache"]["note"].startswith("miss")
    assert _build(str(model))[0]["build_cache"]["note"].startswith("hit")
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())  # a new mtime
    assert _build(str(model))[0]["build_cache"]["note"].startswith("miss")


def test_off_switch_and_a_broken_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODEPLOY_BUILD_CACHE", "0")
    monkeypatch.setenv("AUTODEPLOY_CACHE", str(tmp_path / "home"))
    assert build_cache.cache_dir() is None
    rows, tokens = _build()
    assert "build_cache" not in rows and not (tmp_path / "home" / "build").exists()
    monkeypatch.setenv("AUTODEPLOY_BUILD_CACHE", "1")
    assert build_cache.cache_dir() == tmp_path / "home" / "build"
    monkeypatch.setenv("AUTODEPLOY_BUILD_CACHE", str(tmp_path / "build"))
    _build()
    entry = next(p for p in (tmp_path / "build").iterdir() if p.name != "torch")
    (entry / "graph.pkl").write_bytes(b"not a pickle")
    rows, again = _build()  # unreadable: rebuilt (and written again)
    assert rows["build_cache"]["note"].startswith("miss") and again == tokens
    assert _build()[0]["build_cache"]["note"].startswith("hit")


def test_torch_caches_go_under_the_cache_unless_placed(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    build_cache.enable_torch_caches(tmp_path)
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch" / "inductor")
    build_cache.enable_torch_caches(tmp_path / "elsewhere")  # the first (or the user's) stays
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch" / "inductor")
    assert torch._inductor.config.fx_graph_cache  # what the persistent folder serves
