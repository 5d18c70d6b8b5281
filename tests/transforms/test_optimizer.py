"""The transform framework: stage order, report rows, errors, skip_on_error, lazy cleanup/shapes."""

from dataclasses import dataclass

import pytest
import torch
from torch import fx, nn

from autodeploy.transforms.interface import (
    BaseTransform,
    BuildContext,
    TransformConfig,
    TransformError,
    TransformInfo,
    build_config,
    register,
)
from autodeploy.transforms.optimizer import InferenceOptimizer, plan_pipeline


class _Factory:
    model_class_name = "ToyForCausalLM"


@dataclass
class _RecordConfig(TransformConfig):
    tag: str = ""


@register("_test_record")
class _Record(BaseTransform):
    """Appends its tag to ctx.shared['order']."""

    config_class = _RecordConfig

    def apply(self, model, ctx):
        ctx.shared.setdefault("order", []).append(self.config.tag)
        return model, TransformInfo()


@register("_test_record_2")
class _Record2(_Record):
    pass


@register("_test_fail")
class _Fail(BaseTransform):
    def apply(self, model, ctx):
        raise RuntimeError("boom")


@register("_test_to_graph")
class _ToGraph(BaseTransform):
    """Replaces the model with a tiny exported graph (what export_to_gm does)."""

    def apply(self, model, ctx):
        class M(nn.Module):
            def forward(self, x):
                return torch.relu(x) + 1

        batch = torch.export.Dim("batch")
        gm = torch.export.export(M(), (torch.randn(2, 3),), dynamic_shapes=({0: batch},)).module()
        return gm, TransformInfo(num_matches=1, has_valid_shapes=True)


@register("_test_add_dead_node")
class _AddDeadNode(BaseTransform):
    """Adds an unused node without shape metadata and says the graph is dirty."""

    def apply(self, gm, ctx):
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(x):
            gm.graph.call_function(torch.ops.aten.neg.default, (x,))
        with gm.graph.inserting_after(x):
            live = gm.graph.call_function(torch.ops.aten.abs.default, (x,))
        relu = next(n for n in gm.graph.nodes if n.op == "call_function" and "relu" in str(n.target))
        relu.replace_input_with(x, live)
        gm.recompile()
        return gm, TransformInfo(num_matches=1, is_clean=False, has_valid_shapes=False)


@register("_test_inspect")
class _Inspect(BaseTransform):
    """Records what the graph looks like when it runs."""

    def apply(self, gm, ctx):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        ctx.shared["has_neg"] = any("neg" in str(n.target) for n in nodes)
        ctx.shared["all_have_val"] = all("val" in n.meta for n in nodes)
        return gm, TransformInfo()


def run(transforms, **ctx_kwargs):
    ctx = BuildContext(factory=_Factory(), **ctx_kwargs)
    opt = InferenceOptimizer(transforms)
    model = opt(ctx)
    return model, ctx, opt.report


def test_stage_order_with_yaml_order_inside_a_stage():
    transforms = {
        "_test_record": {"stage": "compile", "tag": "compile"},
        "_test_record_2": {"stage": "factory", "tag": "factory"},
    }
    _, ctx, report = run(transforms)
    assert ctx.shared["order"] == ["factory", "compile"]
    assert [r.name for r in report] == ["_test_record_2", "_test_record"]
    same_stage = {"_test_record_2": {"stage": "export", "tag": "b"}, "_test_record": {"stage": "export", "tag": "a"}}
    assert run(same_stage)[1].shared["order"] == ["b", "a"]


def test_disabled_transform_is_reported_and_not_run():
    _, ctx, report = run({"_test_record": {"stage": "factory", "tag": "x", "enabled": False}})
    assert "order" not in ctx.shared
    (row,) = report
    assert row.skipped and row.note == "disabled" and not row.enabled


def test_failure_names_transform_stage_and_model_class():
    with pytest.raises(TransformError, match=r"'_test_fail' \(stage post_export\) failed on ToyForCausalLM.*boom"):
        run({"_test_fail": {"stage": "post_export"}})


def test_skip_on_error_records_and_continues():
    _, ctx, report = run({
        "_test_fail": {"stage": "export", "skip_on_error": True},
        "_test_record": {"stage": "compile", "tag": "after"},
    })
    assert ctx.shared["order"] == ["after"]
    fail = report[0]
    assert fail.skipped and fail.error == "RuntimeError: boom" and fail.note == "skip_on_error"
    row = report[1].to_dict()
    assert set(row) == {"name", "stage", "enabled", "skipped", "num_matches", "time_s", "mem_change_mb", "note", "error"}


def test_lazy_cleanup_and_shape_prop_before_a_transform_that_needs_them():
    gm, ctx, _ = run({
        "_test_to_graph": {"stage": "export"},
        "_test_add_dead_node": {"stage": "post_export"},
        "_test_inspect": {"stage": "pattern_matcher", "requires_shape_prop": True,
                          "run_graph_cleanup": False},
    })
    assert isinstance(gm, fx.GraphModule)
    assert ctx.shared["has_neg"] is False  # dead node removed before _test_inspect ran
    assert ctx.shared["all_have_val"] is True  # shapes propagated for the new node
    torch.testing.assert_close(gm(torch.tensor([[-1.0, 2.0, -3.0]])), torch.tensor([[2.0, 3.0, 4.0]]))


def test_no_cleanup_when_not_required():
    _, ctx, _ = run({
        "_test_to_graph": {"stage": "export"},
        "_test_add_dead_node": {"stage": "post_export", "run_graph_cleanup": False},
        "_test_inspect": {"stage": "pattern_matcher", "requires_clean_graph": False},
    })
    assert ctx.shared["has_neg"] is True and ctx.shared["all_have_val"] is False


@pytest.mark.parametrize("transforms,needle", [
    ({"export_to_gmm": {"stage": "export"}}, "did you mean export_to_gm"),
    ({"_test_record": {"stage": "factory", "tagg": "x"}}, "tagg"),
    ({"_test_record": {"tag": "x"}}, "'stage' is required"),
    ({"_test_record": {"stage": "exporting"}}, "unknown stage 'exporting'"),
    ({"_test_record": {"stage": "factory", "enabled": "perhaps"}}, "enabled"),
])
def test_bad_pipeline_config(transforms, needle):
    with pytest.raises((KeyError, ValueError), match=needle):
        plan_pipeline(transforms)


def test_build_config_returns_typed_config():
    config = build_config("_test_record", {"stage": "compile", "tag": "t"})
    assert isinstance(config, _RecordConfig) and config.tag == "t" and config.enabled is True


@register("_test_graph_only")
class _GraphOnly(_Record):
    graph_only = True


def test_graph_only_transform_is_skipped_before_export():
    _, ctx, report = run({"_test_graph_only": {"stage": "factory", "tag": "x"}})
    assert "order" not in ctx.shared
    assert report[0].skipped and "exported graph" in report[0].note
