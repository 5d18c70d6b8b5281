"""Fixtures for model ingestion tests: the tiny model directories, built once per cache."""

from __future__ import annotations

import pytest

from autodeploy.models.tiny import TINY_SPECS, ensure_tiny_model

TINY_NAMES = sorted(TINY_SPECS)


@pytest.fixture(scope="session")
def tiny_dirs():
    return {name: ensure_tiny_model(name) for name in TINY_NAMES}


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    """HF models loaded the ordinary way (``from_pretrained``), the reference for our loader."""
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(str(path)).eval() for name, path in tiny_dirs.items()}
