"""Runs the configured transforms in stage order and keeps the transform report."""

from __future__ import annotations

import gc
import logging
import time
import traceback
from typing import Any, Mapping

import torch
from torch import fx, nn

from .graph_utils import canonicalize_graph, run_shape_prop
from .interface import (
    BuildContext,
    Stage,
    TransformConfig,
    TransformError,
    TransformInfo,
    TransformRecord,
    build_config,
    get_transform_class,
)

log = logging.getLogger(__name__)


def plan_pipeline(transforms: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, TransformConfig]]:
    """Validate every transform's options and order them by stage (stable: YAML order within a stage)."""
    configs = [(name, build_config(name, dict(opts or {}))) for name, opts in transforms.items()]
    return sorted(configs, key=lambda item: Stage.parse(item[1].stage))


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.memory_allocated(device) / 2**20
    return 0.0


class InferenceOptimizer:
    """``InferenceOptimizer(transforms_cfg)(ctx)`` builds the optimized model.

    The graph's state (clean? valid shapes?) is tracked between transforms so cleanup and shape
    propagation only run when the next transform needs them and the last one invalidated them.
    """

    def __init__(self, transforms: Mapping[str, Mapping[str, Any]]):
        self.pipeline = plan_pipeline(transforms)
        self.report: list[TransformRecord] = []

    def __call__(self, ctx: BuildContext, model: nn.Module | None = None, progress=None) -> nn.Module:
        model = model if model is not None else nn.Module()
        state = TransformInfo(is_clean=False, has_valid_shapes=False)
        for name, config in self.pipeline:
            record = TransformRecord(name=name, stage=str(Stage.parse(config.stage)), enabled=config.enabled)
            self.report.append(record)
            if progress is not None:
                progress(name)
            if not config.enabled:
                record.skipped, record.note = True, "disabled"
                continue
            transform = get_transform_class(name)(config)
            if transform.graph_only and not isinstance(model, fx.GraphModule):
                record.skipped, record.note = True, "needs the exported graph (no GraphModule yet)"
                continue
            mem0, t0 = _memory_mb(ctx.device), time.perf_counter()
            try:
                model, state = self._prepare(model, config, state)
                model, info = transform.apply(model, ctx)
                model, state = self._finish(model, config, info, state)
            except Exception as e:  # noqa: BLE001 - we re-raise with context unless skip_on_error
                record.error = f"{type(e).__name__}: {e}"
                if not config.skip_on_error:
                    record.time_s = time.perf_counter() - t0
                    model_cls = _model_class_name(model, ctx)
                    raise TransformError(
                        f"transform {name!r} (stage {record.stage}) failed on {model_cls}: {type(e).__name__}: {e}"
                    ) from e
                log.warning("transform %s failed and is skipped (skip_on_error): %s", name, record.error)
                log.debug("%s", traceback.format_exc())
                record.skipped, record.note = True, "skip_on_error"
                state = TransformInfo(is_clean=False, has_valid_shapes=False)
            else:
                record.skipped, record.num_matches, record.note = info.skipped, info.num_matches, info.note
            record.time_s = time.perf_counter() - t0
            record.mem_change_mb = _memory_mb(ctx.device) - mem0
            log.info(
                "[stage=%s, transform=%s] %s matches=%d time=%.3fs%s",
                record.stage, name, "skipped" if record.skipped else "applied", record.num_matches,
                record.time_s, f" ({record.note})" if record.note else "",
            )
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return model

    @staticmethod
    def _prepare(model: nn.Module, config: TransformConfig, state: TransformInfo):
        if not isinstance(model, fx.GraphModule):
            return model, state
        if config.requires_clean_graph and not state.is_clean:
            canonicalize_graph(model)
            state = TransformInfo(is_clean=True, has_valid_shapes=state.has_valid_shapes)
        if config.requires_shape_prop and not state.has_valid_shapes:
            run_shape_prop(model)
            state = TransformInfo(is_clean=state.is_clean, has_valid_shapes=True)
        return model, state

    @staticmethod
    def _finish(model: nn.Module, config: TransformConfig, info: TransformInfo, before: TransformInfo):
        # zero matches means the model is unchanged, so the graph keeps the state it had
        unchanged = info.num_matches == 0
        is_clean = before.is_clean if unchanged else info.is_clean
        has_shapes = before.has_valid_shapes if unchanged else info.has_valid_shapes
        if isinstance(model, fx.GraphModule):
            if config.run_graph_cleanup and not is_clean:
                canonicalize_graph(model)
                is_clean = True
            if config.run_shape_prop and not has_shapes:
                run_shape_prop(model)
                has_shapes = True
        return model, TransformInfo(is_clean=is_clean, has_valid_shapes=has_shapes)


def _model_class_name(model: nn.Module, ctx: BuildContext) -> str:
    factory = ctx.factory
    name = getattr(factory, "model_class_name", None) if factory is not None else None
    return name or type(model).__name__
