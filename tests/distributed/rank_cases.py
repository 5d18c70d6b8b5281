"""Run sharding cases on real gloo ranks (spawned processes) and bring rank 0's findings back.

Each case builds a model's graph on every rank (the real factory and checkpoint loader for the
tiny models, the HF module's own weights for the ``hf_zoo`` architectures), shards it for that
rank, runs it on fixed inputs and records: the logits, every rank's parameter count, the plan,
and a negative control (the same graph with its collectives removed). One spawn runs many cases,
so the ranks pay their start-up once; a case that fails on any rank is recorded as that case's
``error`` (every rank agrees on it before the next collective), and the other cases still run.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
SHAPES = [(1, 1), (2, 7), (3, 16), (1, 33)]


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # a tiny card (tiny_llama, ...) or "zoo:<variant>" (tests/transforms/hf_zoo.py)
    overrides: tuple[str, ...] = ()
    manual: dict = field(default_factory=dict, compare=False, hash=False)
    setup: str | None = None  # a context manager in SETUPS, entered on every rank around this case


class CaseResults:
    """A spawn's results by case id; a case that failed on any rank fails the test that reads it."""

    def __init__(self, results: dict, world: int):
        self.results, self.world = results, world

    def __getitem__(self, case: str) -> dict:
        import pytest

        r = self.results[case]
        if r.get("error"):
            pytest.fail(f"{case} at world {self.world} failed: {r['error']}", pytrace=False)
        return r


@contextlib.contextmanager
def ssm_scan_of_another_signature():
    """A transformers whose Mamba2 scan helper the export patch does not reproduce (for the isolation test)."""
    from transformers.models.nemotron_h import modeling_nemotron_h as modeling

    original = modeling.mamba2_chunk_scan
    modeling.mamba2_chunk_scan = lambda x, dt, A, B, C, chunk_size: None
    try:
        yield
    finally:
        modeling.mamba2_chunk_scan = original


SETUPS = {"ssm_scan_of_another_signature": ssm_scan_of_another_signature}


def inputs(vocab: int, batch: int, seq: int):
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    return torch.randint(3, vocab, (batch, seq), generator=gen), torch.arange(seq).expand(batch, seq).contiguous()


def run_cases(world: int, cases: list[Case]) -> dict:
    """Rank 0's results by case id (each case's error is every rank's: they agree on it)."""
    from spawn_ranks import run_on_ranks

    return run_on_ranks(_run_cases, world, cases, timeout=None, device_type="cpu")[0]


def _run_cases(rank: int, world: int, device: torch.device, cases: list[Case]) -> dict:
    sys.path[:0] = [str(TESTS / "transforms"), str(TESTS / "distributed")]
    torch.manual_seed(0)
    return {case.id: _run_case_alone(case, rank, world) for case in cases}


def _agreed_error(error: str | None, world: int) -> str | None:
    """Every rank's error for this step, joined; None when all ranks succeeded (a collective: all ranks call it)."""
    import torch.distributed as dist

    errors = [None] * world
    dist.all_gather_object(errors, error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    return "; ".join(failed) or None


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _run_case_alone(case: Case, rank: int, world: int) -> dict:
    """One case, isolated: a build that fails on any rank fails this case only, on every rank alike."""
    try:
        with SETUPS[case.setup]() if case.setup else contextlib.nullcontext():
            built, error = _build(case, rank, world), None
    except Exception as e:  # noqa: BLE001 - recorded for this case
        built, error = None, _short(e)
        if rank == 0:
            traceback.print_exc()
    error = _agreed_error(error, world)
    if error is not None:
        return {"error": error}
    try:
        out, error = _run_case(built, rank, world), None
    except Exception as e:  # noqa: BLE001 - a rank that raises before a collective would hang the others; after
        out, error = None, _short(e)  # the build, the forward's collectives are the same on every rank
    error = _agreed_error(error, world)
    return {"error": error} if error is not None else out


def _run_case(built, rank: int, world: int) -> dict:
    import torch.distributed as dist

    gm, reference, vocab, plan, report = built
    out = {"logits": [], "reference": [], "error": None}
    with torch.no_grad():
        for batch, seq in SHAPES:
            ids, pos = inputs(vocab, batch, seq)
            out["logits"].append(gm(ids, pos))
            if rank == 0:
                out["reference"].append(reference(ids, pos))
        counts = [None] * world
        dist.all_gather_object(counts, sum(p.numel() for p in gm.parameters()))
        out["param_counts"] = counts
        out["rows"] = [r.to_dict() for r in plan.rows()] if plan is not None else []
        out["summary"] = plan.summary() if plan is not None else None
        out["report"] = report
        out["collectives"] = [str(n.target) for n in gm.graph.nodes if "autodeploy.all_" in str(n.target)]
        # negative control: the same graph without its all-reduces (or, if it has none, its all-gathers)
        broken = copy.deepcopy(gm)
        kinds = {n.target for n in broken.graph.nodes if "autodeploy.all_" in str(n.target)}
        drop = [t for t in kinds if "all_reduce" in str(t)] or list(kinds)
        for n in list(broken.graph.nodes):
            if n.target in drop:
                n.replace_all_uses_with(n.args[0])
                broken.graph.erase_node(n)
        broken.recompile()
        try:
            ids, pos = inputs(vocab, 2, 7)
            out["without_collectives"] = broken(ids, pos)
        except Exception as e:  # noqa: BLE001 - a shape error is a failure too
            out["without_collectives"] = f"{type(e).__name__}: {e}"
        dist.barrier()
    return out


def _build(case: Case, rank: int, world: int):


    from autodeploy.config import compose_experiment, experiment
    from autodeploy.models.factory import create_factory
    from autodeploy.transforms.interface import BuildContext, Stage
    from autodeploy.transforms.optimizer import InferenceOptimizer

    overrides = [f"args.world_size={world}", "args.device=cpu", "args.dtype=float32", *case.overrides]
    if case.model.startswith("zoo:"):
        return _build_zoo(case.model[4:], overrides, rank, world)
    cfg = experiment(compose_experiment([f"model={case.model}", *overrides], check_transforms=False))
    transforms = copy.deepcopy(cfg.args.transforms)
    transforms = {k: v for k, v in transforms.items() if Stage.parse(v["stage"]) <= Stage.WEIGHT_LOAD}
    factory = create_factory(cfg.args)
    ctx = BuildContext(args=cfg.args, factory=factory, rank=rank, world_size=world)
    optimizer = InferenceOptimizer(transforms)
    gm = optimizer(ctx)
    reference = None
    if rank == 0:
        hf = factory.build_model("cpu")
        factory.load_weights(hf, "cpu")

        def reference(ids, pos):
            return hf(input_ids=ids, position_ids=pos).logits

    return gm, reference, factory.config.vocab_size, ctx.shared.get("sharding_plan"), [r.to_dict() for r in optimizer.report]


def _build_zoo(name: str, overrides: list[str], rank: int, world: int):


    from hf_zoo import PATTERN_PIPELINE, FakeFactory, build_hf_model, export

    from autodeploy.config import compose_experiment, experiment
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    cfg = experiment(compose_experiment(overrides, check_transforms=False))
    transforms = copy.deepcopy(cfg.args.transforms)
    pipeline = {**PATTERN_PIPELINE, "detect_sharding": transforms["detect_sharding"],
                "sharding_transform_executor": transforms["sharding_transform_executor"]}
    hf = build_hf_model(name)
    gm = export(hf)
    ctx = BuildContext(args=cfg.args, factory=FakeFactory(hf.config), rank=rank, world_size=world)
    optimizer = InferenceOptimizer(pipeline)
    gm = optimizer(ctx, gm)  # the zoo graphs hold their weights: the executor slices them in place

    def reference(ids, pos):
        return hf(input_ids=ids, position_ids=pos).logits

    return gm, reference, hf.config.vocab_size, ctx.shared.get("sharding_plan"), [r.to_dict() for r in optimizer.report]
