"""Fixtures for model ingestion tests: the tiny model directories, built once per cache."""

from __future__ import annotations

import pytest
from per_case import PerCase

from autodeploy.models.tiny import TINY_SPECS, ensure_tiny_model

TINY_NAMES = sorted(TINY_SPECS)


@pytest.fixture(scope="session")
def tiny_dirs():
    return PerCase(TINY_NAMES, ensure_tiny_model)


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    """HF models loaded the ordinary way (``from_pretrained``), the reference for our loader."""
    from transformers import AutoModelForCausalLM

    return PerCase(TINY_NAMES, lambda name: AutoModelForCausalLM.from_pretrained(str(tiny_dirs[name])).eval())
