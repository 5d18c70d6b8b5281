"""export_to_gm's retry with Dim.DYNAMIC hints when torch rejects the named dims.

torch 2.11 fails the tiny Bloom (ALiBi) with a ConstraintViolationError on guards that hold for every
size (``min(s, 4*s) == s``); later torch proves them. Here the first attempt is made to fail that way.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from autodeploy.export.export import ExportError, export_to_gm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transforms"))
from hf_zoo import build_hf_model, sample_inputs  # noqa: E402

VIOLATION = ("Constraints violated (seq)! For more information, run with TORCH_LOGS=\"+dynamic\".\n"
             "  - Not all values of seq = L['input_ids'].size()[1] in the specified range seq <= 64 satisfy the "
             "generated guard min(L['input_ids'].size()[1], 4*L['input_ids'].size()[1]) == L['input_ids'].size()[1].")


@pytest.fixture
def named_dims_rejected(monkeypatch):
    """torch.export (which export_to_gm calls as ``torch.export.export``) raises on named Dims;
    ``on_hints`` may rewrite the dynamic shapes of the hinted call. Returns the calls' dim kinds."""
    real_export, calls = torch.export.export, []

    def export(mod, args, *, dynamic_shapes, **kwargs):
        named = any(isinstance(d, Dim) for dims in dynamic_shapes.values() for d in dims.values())
        calls.append("named" if named else "hints")
        if named:
            raise ConstraintViolationError(VIOLATION)
        return real_export(mod, args, dynamic_shapes=export.on_hints(dynamic_shapes), **kwargs)

    export.on_hints = lambda shapes: shapes
    monkeypatch.setattr(torch.export, "export", export)
    return export, calls


def test_constraint_violation_falls_back_to_dynamic_hints(named_dims_rejected, caplog):
    _, calls = named_dims_rejected
    hf = build_hf_model("bloom")
    with caplog.at_level(logging.WARNING, logger="autodeploy.export.export"):
        gm = export_to_gm(hf, max_batch_size=8, max_seq_len=64)
    assert calls == ["named", "hints"] and gm.meta["autodeploy_export"]["dims"] == "Dim.DYNAMIC"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "BloomForCausalLM" in warnings[0] and "Dim.DYNAMIC" in warnings[0]
    assert "- Not all values of seq" in warnings[0]
    for batch, seq in [(1, 1), (3, 17)]:  # neither the export example (2, 8) nor each other
        ids, pos = sample_inputs(batch, seq)
        with torch.no_grad():
            assert torch.equal(gm(ids, pos), hf(input_ids=ids, position_ids=pos, use_cache=False).logits)


def test_fallback_that_specializes_seq_is_an_error(named_dims_rejected):
    export, calls = named_dims_rejected
    # the hinted export as if it had pinned seq: no dim 1 in the dynamic shapes makes it static
    export.on_hints = lambda shapes: {name: {0: dims[0]} for name, dims in shapes.items()}
    with pytest.raises(ExportError, match=r"Dim.DYNAMIC dims\) made batch/seq of BloomForCausalLM constants: "
                                          r"input_ids.shape\[1\] = 8"):
        export_to_gm(build_hf_model("bloom"), max_batch_size=8, max_seq_len=64)
    assert calls == ["named", "hints"]
