"""Exported tiny models shared by the export tests (each export takes a few seconds)."""

from __future__ import annotations

import pytest

from per_case import PerCase

TINY_NAMES = ["tiny_llama", "tiny_mixtral", "tiny_hybrid"]


@pytest.fixture(scope="session")
def exported_models():
    """name -> (factory, GraphModule with checkpoint weights on CPU, HF reference from from_pretrained)."""
    from transformers import AutoModelForCausalLM

    from autodeploy.export.export import export_to_gm
    from autodeploy.models.factory import ModelFactory

    def build(name):
        factory = ModelFactory(name)
        gm = export_to_gm(factory.build_model("meta"), max_batch_size=8, max_seq_len=256)
        factory.load_weights(gm, "cpu")
        ref = AutoModelForCausalLM.from_pretrained(str(factory.source.local_dir)).eval()
        return factory, gm, ref

    return PerCase(TINY_NAMES, build)  # one model's failed export fails only its own tests
