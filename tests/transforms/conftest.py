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

from hf_zoo import VARIANTS, FakeFactory, build_hf_model, export  # noqa: E402

# the front of the default pipeline, as the tests run it
PATTERN_PIPELINE = {
    "cleanup_assertions": {"stage": "post_export"},
    "cleanup_noop_ops": {"stage": "post_export"},
    "match_attention_pattern": {"stage": "pattern_matcher"},
    "match_rope_pattern": {"stage": "pattern_matcher"},
    "match_rmsnorm_pattern": {"stage": "pattern_matcher"},
    "match_moe_pattern": {"stage": "pattern_matcher"},
    "eliminate_redundant_transposes": {"stage": "pattern_matcher"},
}


def run_pipeline(gm, config=None, transforms=None):
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    optimizer = InferenceOptimizer(transforms or PATTERN_PIPELINE)
    ctx = BuildContext(factory=FakeFactory(config) if config is not None else None)
    gm = optimizer(ctx, gm)
    return gm, {r.name: r for r in optimizer.report}


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
