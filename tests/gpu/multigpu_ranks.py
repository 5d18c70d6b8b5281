"""Two NCCL ranks, one per GPU, for ``test_multigpu.py``: each builds ``tiny_llama``'s sharded graph
(the real factory, checkpoint loader and sharding transforms, up to the weight load) on its GPU and
runs the same inputs twice: with the one-shot symmetric-memory all-reduce that the sharding
executor sets up (``allreduce_strategy=auto``), then with NCCL (the one-shot buffers set aside). A
dtype that torch's one-shot kernel does not take goes to NCCL in both runs (recorded).
Rank 0 also runs HF transformers in float32 on the same inputs, to show both are right, not only equal.
"""

from __future__ import annotations

import copy

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from spawn_ranks import run_on_ranks  # noqa: E402

# decode- and prefill-sized batches (the hidden states of all are under the one-shot's 1 MiB limit),
# each run several times back to back: consecutive all-reduces reuse the two symmetric buffers
SHAPES = [(1, 1), (4, 1), (2, 7), (1, 33), (3, 16), (8, 1)]
ROUNDS = 5


def run(world: int, dtype: str, timeout: float = 420.0) -> list[dict]:
    """Every rank's findings, in rank order."""
    return run_on_ranks(_one_shot_vs_nccl, world, dtype, timeout=timeout)


def _one_shot_vs_nccl(rank: int, world: int, device: torch.device, dtype: str) -> dict:
    from autodeploy.config import compose_experiment, experiment
    from autodeploy.distributed import collectives
    from autodeploy.models.factory import create_factory
    from autodeploy.transforms.interface import BuildContext, Stage
    from autodeploy.transforms.optimizer import InferenceOptimizer

    cfg = experiment(compose_experiment(["model=tiny_llama", f"args.world_size={world}", "args.device=cuda",
                                         f"args.dtype={dtype}"], check_transforms=False))
    transforms = copy.deepcopy(cfg.args.transforms)
    transforms = {k: v for k, v in transforms.items() if Stage.parse(v["stage"]) <= Stage.WEIGHT_LOAD}
    assert transforms["sharding_transform_executor"]["allreduce_strategy"] == "auto"
    factory = create_factory(cfg.args)
    ctx = BuildContext(args=cfg.args, factory=factory, device=device, dtype=factory.dtype, rank=rank, world_size=world)
    gm = InferenceOptimizer(transforms)(ctx)
    one_shot_groups = dict(collectives._SYMM)  # set up by the sharding executor (collective)
    calls = {"one_shot": 0}
    original = collectives._SymmBuffers.all_reduce

    def counted(self, x):
        calls["one_shot"] += 1
        return original(self, x)

    collectives._SymmBuffers.all_reduce = counted
    vocab = factory.config.vocab_size
    batches = []
    for batch, seq in SHAPES:
        gen = torch.Generator().manual_seed(batch * 100 + seq)
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        batches.append((ids.to(device), torch.arange(seq).expand(batch, seq).contiguous().to(device)))

    def run_all():
        with torch.no_grad():
            return [gm(ids, pos).float().cpu() for _ in range(ROUNDS) for ids, pos in batches]

    try:
        one_shot = run_all()
        one_shot_calls = calls["one_shot"]
        collectives._SYMM.clear()  # the same graph and weights, every all-reduce on NCCL
        nccl = run_all()
        nccl_one_shot_calls = calls["one_shot"] - one_shot_calls
    finally:
        collectives._SymmBuffers.all_reduce = original
        collectives._SYMM.update(one_shot_groups)
    found = {
        "groups": sorted(one_shot_groups),
        # torch's kernel may not take this dtype (float16): then NCCL carries it, with or without one-shot buffers
        "kernel_takes_dtype": all(factory.dtype in symm.dtypes for symm in one_shot_groups.values()),
        "all_reduces_per_forward": sum(1 for n in gm.graph.nodes if "autodeploy.all_reduce" in str(n.target)),
        "forwards": ROUNDS * len(batches),
        "one_shot_calls": one_shot_calls,
        "one_shot_calls_in_nccl_run": nccl_one_shot_calls,
        "unequal": [i for i, (a, b) in enumerate(zip(one_shot, nccl)) if not torch.equal(a, b)],
        "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(one_shot, nccl)),
    }
    if rank == 0:  # HF transformers in float32 on the same inputs: both runs are right, not only equal
        reference = create_factory(compose_experiment(["model=tiny_llama", "args.device=cuda", "args.dtype=float32"]).args)
        hf = reference.build_model(str(device))
        reference.load_weights(hf, str(device))
        hf.eval()
        errors = []
        with torch.no_grad():
            for (ids, pos), got in zip(batches, one_shot):
                ref = hf(input_ids=ids, position_ids=pos).logits.float().cpu()
                errors.append(float((got - ref).norm() / ref.norm()))
        found["relative_error_vs_hf_fp32"] = max(errors)
    return found
