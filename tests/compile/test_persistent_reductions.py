"""``compile/reductions.py`` on the CPU: which reductions the wider limit turns into one-pass
kernels, and that the context installs and removes inductor's handler and cache tag (inductor's
CPU backend does not ask this question: the kernels themselves are checked in
tests/gpu/test_compile_model.py)."""

import types

import pytest
import sympy
import torch
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from autodeploy.compile.reductions import _wide_rows_choices, persistent_reductions


class _Sizevars:
    @staticmethod
    def statically_known_leq(a, b):
        return bool(sympy.Integer(a) <= sympy.Integer(b))

    statically_known_geq = staticmethod(lambda a, b: bool(sympy.Integer(a) >= sympy.Integer(b)))
    optimization_hint = staticmethod(int)


def _features(hint, numel):
    return types.SimpleNamespace(get_reduction_hint=lambda: hint, reduction_numel=sympy.Integer(numel),
                                 numel=sympy.Integer(2048))


@pytest.fixture
def fake_graph():
    with V.set_graph_handler(types.SimpleNamespace(sizevars=_Sizevars())):
        yield


@pytest.mark.parametrize("hint,numel,one_pass", [
    (ReductionHint.INNER, 4096, True),    # the RMSNorm over Llama-3.1-8B's hidden size
    (ReductionHint.INNER, 8192, True),
    (ReductionHint.INNER, 8193, False),   # wider than the limit: inductor's own answer (loop)
    (ReductionHint.INNER, 512, True),     # inductor's own answer too
])
def test_inner_rows_up_to_the_width_reduce_in_one_pass(fake_graph, hint, numel, one_pass):
    choices = _wide_rows_choices(8192)
    assert choices.should_use_persistent_reduction(_features(hint, numel), False) is one_pass


def test_other_reductions_keep_inductors_answer(fake_graph):
    from torch._inductor.choices import InductorChoices

    cases = [(ReductionHint.OUTER, False), (ReductionHint.DEFAULT, False), (ReductionHint.INNER, True)]  # True: cooperative
    for hint, cooperative in cases:
        f = _features(hint, 4096)
        assert _wide_rows_choices(8192).should_use_persistent_reduction(f, cooperative) == \
            InductorChoices.should_use_persistent_reduction(f, cooperative)
    assert not InductorChoices.should_use_persistent_reduction(_features(ReductionHint.INNER, 4096), False)


def test_context_installs_and_restores_the_handler_and_cache_tag():
    before = type(V.choices)
    tag = getattr(torch.compiler.config, "cache_key_tag", None)
    with persistent_reductions(8192):
        assert type(V.choices).__name__ == "WideRows"
        if tag is not None:
            assert torch.compiler.config.cache_key_tag.endswith("autodeploy-persistent-8192")
    assert type(V.choices) is before
    assert getattr(torch.compiler.config, "cache_key_tag", None) == tag
    with persistent_reductions(1024):  # inductor's own limit: nothing installed
        assert type(V.choices) is before
