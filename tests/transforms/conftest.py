"""Exported and transformed models shared by the transform tests (export takes about a second each)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import autodeploy.custom_ops.attention  # noqa: F401  the tests name torch.ops.autodeploy.* at import
import autodeploy.custom_ops.moe  # noqa: F401
import autodeploy.custom_ops.rms_norm  # noqa: F401
import autodeploy.custom_ops.rope  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))

from hf_zoo import VARIANTS, build_hf_model, export, run_pipeline  # noqa: E402

class Deployed:
    def __init__(self, name):
        self.name = name
        self.variant = VARIANTS[name]
        self.hf = build_hf_model(name)
        self.gm, self.report = run_pipeline(export(self.hf), self.hf.config)


@pytest.fixture(scope="session")
def deployed():
    """name -> Deployed (HF model, transformed GraphModule, transform report), built on first use."""
    cache: dict[str, Deployed] = {}

    def get(name: str) -> Deployed:
        if name not in cache:
            cache[name] = Deployed(name)
        return cache[name]

    return get
