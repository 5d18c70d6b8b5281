"""The build-time benchmark runs the default pipeline's front and reports what it built."""

from __future__ import annotations


def test_pipeline_comes_from_default_yaml_in_stage_order():
    from autodeploy.bench.build_time import pattern_pipeline
    from autodeploy.transforms.optimizer import plan_pipeline

    transforms = pattern_pipeline()
    assert list(transforms)[:2] == ["cleanup_assertions", "cleanup_noop_ops"]
    assert {"match_attention_pattern", "match_rope_pattern", "match_rmsnorm_pattern", "match_moe_pattern",
            "eliminate_redundant_transposes"} <= set(transforms)
    stages = [config.stage for _, config in plan_pipeline(transforms)]
    assert stages == sorted(stages, key=["post_export", "pattern_matcher"].index)


def test_tiny_model_row(capsys):
    from autodeploy.bench.build_time import main

    (row,) = main(["--models", "tiny_mixtral"])
    assert row["ops"] == {"attention": 2, "moe": 2, "rms_norm": 5, "rope": 2}
    assert row["total_s"] >= row["export_s"] > 0
    assert "tiny_mixtral" in capsys.readouterr().out
