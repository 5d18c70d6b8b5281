"""compile/inline.py: the row-wise canonical ops reach the compiler as plain torch code.

A recording dynamo backend (no inductor codegen, so this stays cheap on the CPU) shows what
torch.compile sees: after inlining, no rms_norm / fused_add_rms_norm / silu_mul / rope op is left
in the captured graph (inductor can fuse their math), attention still is an op, and generation is
unchanged.
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from tiny_deployment import tiny  # noqa: E402

from autodeploy.compile.inline import inline_for_inductor, reference_impls  # noqa: E402
from autodeploy.runtime.engine import Engine  # noqa: E402
from autodeploy.runtime.sampling_params import SamplingParams  # noqa: E402

ROW_WISE = ("autodeploy.rms_norm", "autodeploy.fused_add_rms_norm", "autodeploy.silu_mul", "autodeploy.rope")


def _ops(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_inlined_graph_compiles_without_opaque_row_ops():
    dep = tiny("tiny_llama")
    before = _ops(dep.graph)
    row_ops = [t for t in before if t.startswith(ROW_WISE)]
    assert len(row_ops) == 1 + 4 + 2 + 2  # rms_norm, fused add+norm, silu_mul, rope (2 layers)
    gm = copy.deepcopy(dep.graph)
    assert inline_for_inductor(gm) == len(row_ops)
    assert not any(t.startswith(ROW_WISE) for t in _ops(gm))

    captured = []

    def record(graph, example_inputs):
        captured.append(graph)
        return graph.forward

    compiled = torch.compile(gm, backend=record, dynamic=True)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[1, 5, 9, 22, 41, 7], [1, 3]]
    ref = dep.engine().generate(prompts, sp)
    outs = Engine(compiled, dep.cache, dep.tokenizer).generate(prompts, sp)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    seen = [str(n.target) for g in captured for n in g.graph.nodes if n.op == "call_function"]
    assert captured and not any("autodeploy.rms_norm" in t or "silu_mul" in t or "autodeploy.rope" in t for t in seen)
    assert any("torch_cached_attention" in t for t in seen)  # attention stays an op (its own kernels)
    assert any("rsqrt" in t for t in seen)  # the norm's math is there, for inductor to fuse


def test_every_inlined_op_has_its_reference():
    impls = reference_impls()
    assert {str(op).rsplit(".", 1)[0] for op in impls} == {*ROW_WISE, "autodeploy.linear"}


def test_linear_op_is_a_plain_linear_where_the_trace_has_more_than_one_token():
    """``autodeploy::linear`` inlined: ``F.linear`` in a graph traced for T >= 2 tokens (T backed:
    ``compiles=two``), the op itself where T is 1 or unknown (unbacked: ``compiles=one``)."""
    import torch.nn.functional as F

    import autodeploy.custom_ops.linear  # noqa: F401 - registers the op

    impls = reference_impls()
    fn = impls[torch.ops.autodeploy.linear.default]
    w = torch.randn(6, 8)
    graphs = []

    def record(graph, example_inputs):
        graphs.append([n.target for n in graph.graph.nodes if n.op == "call_function"])
        return graph.forward

    for tokens, mark in ((5, torch._dynamo.maybe_mark_dynamic), (1, torch._dynamo.maybe_mark_dynamic),
                         (3, torch._dynamo.decorators.mark_unbacked)):
        torch._dynamo.reset()
        x = torch.randn(1, tokens, 8)
        mark(x, 1)
        out = torch.compile(fn, backend=record, fullgraph=True)(x, w)
        torch.testing.assert_close(out, F.linear(x, w))
    op = torch.ops.autodeploy.linear.default
    assert op not in graphs[0] and F.linear in graphs[0]
    assert op in graphs[1] and op in graphs[2]


def test_host_functions_equal_the_ops_bitwise():
    """The CPU's torch-simple graphs call lean host functions instead of the ops (inline_for_host):
    the same values, bit for bit, in float32 and bfloat16 (HF's rounding either way)."""
    from autodeploy.compile.inline import host_impls
    from autodeploy.custom_ops.add_rms_norm import fused_add_rms_norm_host, fused_add_rms_norm_reference
    from autodeploy.custom_ops.rms_norm import rms_norm_host, rms_norm_reference
    from autodeploy.custom_ops.rope import rope_host, rope_reference

    ops = {str(op).rsplit(".", 1)[0] for op in host_impls() if str(op).startswith("autodeploy.")}
    assert ops == {*ROW_WISE, "autodeploy.torch_cached_attention"}
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (1, 7, 300):
            x, r = (torch.randn(1, tokens, 576, generator=gen).mul(3).to(dtype) for _ in range(2))
            w = torch.randn(576, generator=gen).to(dtype)
            assert torch.equal(rms_norm_host(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
            for a, b in zip(fused_add_rms_norm_host(x, r, w, 1e-5), fused_add_rms_norm_reference(x, r, w, 1e-5)):
                assert torch.equal(a, b)
            q, k = torch.randn(1, tokens, 9, 64, generator=gen).to(dtype), torch.randn(1, tokens, 3, 64, generator=gen).to(dtype)
            angles = torch.randn(1, tokens, 32, generator=gen)
            cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
            for a, b in zip(rope_host(q, k, cos, sin, False), rope_reference(q, k, cos, sin, False)):
                assert a.dtype == b.dtype and torch.equal(a, b)
            for a, b in zip(rope_host(q, k, cos[..., :32], sin[..., :32], False),  # partial: the reference
                            rope_reference(q, k, cos[..., :32], sin[..., :32], False)):
                assert torch.equal(a, b)
