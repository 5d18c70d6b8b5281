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

CACHED_STAGES = Stage.SHARDING  # the build cache holds the graph as this stage leaves it


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

    def __call__(self, ctx: BuildContext, model: nn.Module | None = None, progress=None, cache=None) -> nn.Module:
        """``cache``: a ``build_cache.BuildCache``; a hit starts at ``weight_load`` with the graph
        it holds, a miss saves the graph as the ``sharding`` stage leaves it."""
        restored = self._restore(cache, ctx) if cache is not None and model is None else None
        model = model if model is not None else nn.Module()
        state = TransformInfo(is_clean=False, has_valid_shapes=False)
        if restored is not None:
            model, state = restored
        pending_save = cache is not None and restored is None
        for name, config in self.pipeline:
            stage = Stage.parse(config.stage)
            if restored is not None and stage <= CACHED_STAGES:
                if progress is not None:
                    progress(name)
                continue
            if pending_save and stage > CACHED_STAGES and isinstance(model, fx.GraphModule):
                pending_save = False
                self._save(cache, model, ctx, state)
            record = TransformRecord(name=name, stage=str(stage), enabled=config.enabled)
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

    def _restore(self, cache, ctx: BuildContext):
        t0 = time.perf_counter()
        restored = cache.load()
        if restored is None:
            return None
        ctx.shared.update(restored.shared)
        if restored.factory_record is not None and ctx.factory is not None:
            ctx.factory.build_record = restored.factory_record
        for row in restored.records:
            row.time_s, row.mem_change_mb = 0.0, 0.0
            row.note = f"{row.note}; " if row.note else ""
            row.note += "from the build cache"
        self.report += restored.records
        self.report.append(TransformRecord(name="build_cache", stage=str(Stage.EXPORT), enabled=True, num_matches=1,
                                           time_s=time.perf_counter() - t0,
                                           note=f"hit {cache.key[:12]}: {CACHED_STAGES} and the stages before skipped"))
        log.info("build cache hit (%s): the graph after %s in %.2fs", cache.path, CACHED_STAGES,
                 time.perf_counter() - t0)
        return restored.model, TransformInfo(is_clean=restored.is_clean, has_valid_shapes=restored.has_valid_shapes)

    def _save(self, cache, model: fx.GraphModule, ctx: BuildContext, state: TransformInfo) -> None:
        t0 = time.perf_counter()
        records = [TransformRecord(**r.to_dict()) for r in self.report]
        saved = cache.save(model, ctx.shared, records, state.is_clean, getattr(ctx.factory, "build_record", None))
        self.report.append(TransformRecord(name="build_cache", stage=str(CACHED_STAGES), enabled=True,
                                           num_matches=int(saved), time_s=time.perf_counter() - t0,
                                           note=f"miss {cache.key[:12]}: " + ("saved" if saved else "not cacheable")))

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
