"""The Python API: ``LLM(model=..., **args_fields).generate(prompts, SamplingParams(...))``.

Keyword arguments are the fields of ``args`` (see ``config/schema.py``), validated against the same
schema as the command line; ``yaml_extra=[...]`` names args-level YAML files (``args.yaml_extra``).
Precedence is the command line's: keyword arguments > YAML files > built-in defaults.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import time
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig

from .config import ConfigError, compose_experiment, experiment
from .config.cli import model_cards
from .config.schema import AutoDeployArgs, ExperimentConfig

log = logging.getLogger(__name__)

ARG_FIELDS = [f.name for f in fields(AutoDeployArgs)]


def config_from_kwargs(model: str | None = None, **kwargs: Any) -> ExperimentConfig:
    """Resolve the experiment config that ``LLM(model, **kwargs)`` runs with."""
    unknown = [k for k in kwargs if k not in ARG_FIELDS]
    if unknown:
        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(k, ARG_FIELDS, n=3, cutoff=0.5)
            msgs.append(f"'{k}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"LLM() got unknown argument(s): {', '.join(msgs)}; valid: {', '.join(ARG_FIELDS)}")
    model = model if model is not None else kwargs.pop("model", None)
    kwargs.pop("model", None)
    overrides: list[str] = []
    layer: dict[str, Any] = {"args": dict(kwargs)}
    if model is not None:
        if model in model_cards():
            overrides.append(f"model={model}")  # a card selects its config group option
        else:
            layer["args"]["model"] = str(model)
    return experiment(compose_experiment(overrides, extra_layer=layer))


class LLM:
    """Builds the optimized model and its engine once; ``generate`` runs requests through it."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        start = time.perf_counter()
        self.config = config_from_kwargs(model, **kwargs)
        config_s = time.perf_counter() - start
        self._build(self.args.world_size)  # the API's one read of the world; handed down from here
        self.build_phases = {"config": config_s, **self.build_phases}  # from_config: composed elsewhere

    @classmethod
    def from_config(cls, config: ExperimentConfig | DictConfig, world_size: int | None = None) -> "LLM":
        """Build from an experiment config (launch.py's, or ``compose_experiment``'s, converted here);
        ``world_size``: the run's, when its caller has read it (``run``), else the config's."""
        llm = cls.__new__(cls)
        llm.config = config if isinstance(config, ExperimentConfig) else experiment(config)
        llm._build(llm.args.world_size if world_size is None else world_size)
        return llm

    @property
    def args(self) -> AutoDeployArgs:
        return self.config.args

    def _build(self, world_size: int) -> None:
        start = time.perf_counter()
        from .build import build_engine
        from .config import preflight

        self.world_size = world_size
        # ranks, device choices, model, checkpoint: before any model work (its factory serves the build)
        factory = preflight(self.config, world_size)
        preflight_s = time.perf_counter() - start  # imports and checks, before build_engine's own phases
        self.ranks = None
        if world_size > 1:
            from .distributed.ranks import start

            self.ranks = start(self.config, world_size)  # spawns (or joins) the other ranks
        try:
            # marked busy: a worker that fails while rank 0 waits in one of the build's collectives
            # (process groups, the KV cache sizing) ends the run instead of hanging it
            with self.ranks.busy() if self.ranks is not None else contextlib.nullcontext():
                built = build_engine(self.args, rank=0, world_size=world_size, factory=factory)
        except BaseException as e:
            failure = self.ranks.failure(e) if self.ranks is not None else None
            self.shutdown()
            if failure is not None:
                raise failure from e
            raise
        self.engine, self.factory, self.build_report = built.engine, built.factory, built.report
        self.build_phases = {"preflight": preflight_s, **built.phases}
        self.sharding_plan = built.sharding
        self.engine.ranks = self.ranks
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True):
        """One ``RequestOutput`` per prompt, in order (strings, token-id lists or chat messages).

        ``sampling_params``: one ``SamplingParams`` for all prompts, a list (one per prompt) or None
        (defaults). A bad prompt or bad params fail only that request (``finish_reason="error"``).
        """
        return self._require_engine().generate(prompts, sampling_params, progress=use_tqdm)

    def stream(self, prompts, sampling_params=None):
        """Yield ``RequestOutput`` snapshots (text and token_ids so far) as requests progress;
        each request's last one has ``finished == True``."""
        return self._require_engine().stream(prompts, sampling_params)

    def _require_engine(self):
        if self.engine is None:
            raise RuntimeError("this LLM was shut down; create a new one")
        return self.engine

    def shutdown(self) -> None:
        """Free the engine and end the other ranks of a multi-rank run (also done at interpreter exit)."""
        self.engine = None
        if getattr(self, "ranks", None) is not None:
            self.ranks.shutdown()
            self.ranks = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"LLM(model={self.config.model!r}, world_size={self.world_size})"
