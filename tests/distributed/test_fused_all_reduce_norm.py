"""``fuse_allreduce_residual_rmsnorm`` and the step channel at world_size 2 on the CPU (gloo).

The fusion on and off give the same logits, bit for bit (on the CPU the fused op runs the two ops
it replaces), and greedy tokens equal HF ``generate``; the graph holds the fused op at every
all-reduce -> add+norm and nowhere it would not be exact. The same runs check the one message per
decode step that rank 0 sends the workers, and the per-rank host times the benchmark reports.
(The one kernel over symmetric memory: tests/distributed/test_all_reduce_norm_kernel.py in Triton's
interpreter, tests/gpu/test_multigpu.py on two GPUs.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from autodeploy import LLM, SamplingParams
from autodeploy.compile.regions import nodes_through_regions

CPU = dict(device="cpu", dtype="float32", max_batch_size=4, max_seq_len=128, attn_page_size=16, max_num_tokens=16,
           compile_backend="torch-simple")
OFF = {"transforms": {"fuse_allreduce_residual_rmsnorm": {"enabled": False}}}
# a 45-token prompt prefilled in chunks of 16 tokens (over 3 KV pages) beside short ones
PROMPTS = [[1] + [(7 * i) % 500 + 3 for i in range(44)], [1, 5, 9, 22, 41, 7], [1, 3, 4]]
ASKS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=3)
FUSED, ALL_REDUCE, ADD_NORM = ("autodeploy.all_reduce_add_rms_norm.default", "autodeploy.all_reduce.default",
                               "autodeploy.fused_add_rms_norm.default")


def _ops(llm: LLM) -> Counter:
    """The graph's calls by op name; a CPU graph calls some ops' host functions (``inline_for_host``)."""
    from autodeploy.compile.inline import host_impls

    op_of = {fn: op for op, fn in host_impls().items()}
    return Counter(str(op_of.get(n.target, n.target)) for n, _ in nodes_through_regions(llm.engine.model)
                   if n.op == "call_function")


def _hf_greedy(name: str, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    from autodeploy.eval.reference import hf_greedy
    from autodeploy.models.tiny import ensure_tiny_model

    hf = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(name), dtype=torch.float32).eval()
    return hf_greedy(hf, prompt, n)


def _run(name: str, extra: dict) -> dict:
    """One world_size-2 build: its graph's ops, the report row, the outputs, and what rank 0 broadcast."""
    with LLM(name, world_size=2, **CPU, **extra) as llm:
        found = {"ops": _ops(llm), "row": next(r for r in llm.build_report if r["name"] == "fuse_allreduce_residual_rmsnorm")}
        sizes = []
        broadcast = dist.broadcast

        def counted(tensor, src, *args, **kwargs):
            sizes.append(tensor.numel())
            return broadcast(tensor, src, *args, **kwargs)

        dist.broadcast = counted
        try:
            before = llm.ranks.worker_step_times()[1]
            llm.engine.step_timings.clear()
            found["outs"] = llm.generate(PROMPTS, ASKS, use_tqdm=False)
            found["steps"] = [(s.num_seqs, s.num_tokens) for s in llm.engine.step_timings]
            after = llm.ranks.worker_step_times()[1]
            found["broadcasts"] = sizes[1:-1]  # the generate's: between the two report messages
        finally:
            dist.broadcast = broadcast
        found["worker_steps"] = after["steps"] - before["steps"]
        found["message_size"] = llm.engine.cache.info.message_size
        found["info"] = llm.engine.cache.info
        if name == "tiny_llama" and not extra:
            from autodeploy.bench.benchmark import run_benchmark

            bench = OmegaConf.create({"enabled": True, "bs": 2, "isl": 20, "osl": 8, "num": 1, "warmup": 0,
                                      "compare_hf": False})
            found["bench"] = run_benchmark(llm.engine, bench)["by_batch_size"]["2"]
    return found


@pytest.fixture(scope="module")
def fused():
    return _run("tiny_llama", {})


@pytest.fixture(scope="module")
def unfused():
    return _run("tiny_llama", OFF)


def test_fusion_on_and_off_give_the_same_logits_and_hf_tokens(fused, unfused):
    for on, off, prompt in zip(fused["outs"], unfused["outs"], PROMPTS):
        assert on.error is None and off.error is None
        assert on.token_ids == off.token_ids == _hf_greedy("tiny_llama", prompt, 8)
        # every prompt and generated position's top-3 logprobs: the same floats
        assert on.prompt_logprobs == off.prompt_logprobs and on.logprobs == off.logprobs


def test_graph_has_the_fused_op_at_every_all_reduce_then_add_norm(fused, unfused):
    # tiny_llama: 2 layers, an all-reduce after attention and after the MLP, each read by an add+norm
    # (the last one by the final norm); the logits' all-gather stays
    assert unfused["ops"][ALL_REDUCE] == unfused["ops"][ADD_NORM] == 4 and unfused["ops"][FUSED] == 0
    assert fused["ops"][FUSED] == 4 and fused["ops"][ALL_REDUCE] == 0 and fused["ops"][ADD_NORM] == 0
    assert fused["ops"]["autodeploy.all_gather.default"] == unfused["ops"]["autodeploy.all_gather.default"] == 1
    assert fused["row"]["num_matches"] == 4 and "the all-reduce, then the add+norm" in fused["row"]["note"]
    assert unfused["row"]["enabled"] is False


def test_one_message_per_step_unless_a_step_outgrows_it(fused):
    """Rank 0 sends each step in one broadcast of ``message_size`` values (header + any decode batch);
    only a prefill chunk larger than that sends a second message with the rest."""
    info, size = fused["info"], fused["message_size"]
    assert size == info.packed_size(4, 4, 4)  # a decode step of max_batch_size sequences fits
    expected = []
    for num_seqs, num_tokens in fused["steps"]:
        end = info.packed_size(num_seqs, num_tokens, num_tokens)  # every row's logits (prompt_logprobs): G = T
        expected += [size] + ([end - size] if end > size else [])
    assert fused["broadcasts"] == expected
    assert sum(t == s for s, t in fused["steps"]) >= 7  # decode steps: one message each
    assert len(fused["broadcasts"]) > len(fused["steps"])  # and some prefill chunks sent two
    assert fused["worker_steps"] == len(fused["steps"])  # the worker ran every step rank 0 scheduled


def test_benchmark_reports_host_time_per_step_of_each_rank(fused):
    by_rank = fused["bench"]["decode_host_ms_per_step_by_rank"]
    waits = fused["bench"]["decode_wait_ms_per_step_by_rank"]
    assert len(by_rank) == len(waits) == 2 and all(m is not None and m > 0 for m in by_rank + waits)


def test_expert_parallel_moe_all_reduce_is_fused_too():
    """tiny_mixtral with its experts split over the ranks (EP): the MoE output's all-reduce, then add+norm."""
    found = _run("tiny_mixtral", {"transforms": {"detect_sharding": {"sharding_dims": ["tp", "ep"]}}})
    assert found["ops"][FUSED] == 4 and found["ops"][ALL_REDUCE] == 0
    for out, prompt in zip(found["outs"], PROMPTS):
        assert out.token_ids == _hf_greedy("tiny_mixtral", prompt, 8)


class _Pairs(nn.Module):
    """all-reduce -> add+norm in the cases the transform must take and must leave."""

    def forward(self, y, residual, w):
        ops = torch.ops.autodeploy
        n1, s1 = ops.fused_add_rms_norm(ops.all_reduce(y, "0,1"), residual, w, 1e-5)  # taken
        n2, s2 = ops.fused_add_rms_norm(s1, ops.all_reduce(n1, "0,1"), w, 1e-5)  # taken: the sum is commutative
        shared = ops.all_reduce(n2, "0,1")  # left: the all-reduce has another user
        n3, s3 = ops.fused_add_rms_norm(shared, s2, w, 1e-5)
        n4, s4 = ops.fused_add_rms_norm(ops.all_reduce(n3, "0"), s3, w, 1e-5)  # left: one rank, nothing to fold
        n5, s5 = ops.fused_add_rms_norm(n4, s4, w, 1e-5)  # left: no all-reduce
        flat = ops.all_reduce(n5.reshape(-1), "0,1")  # taken: reshaped back, as an MoE's output
        n6, s6 = ops.fused_add_rms_norm(flat.view(3, 8), s5, w, 1e-5)
        seen = ops.all_reduce(n6.reshape(-1), "0,1").view(3, 8)  # left: the reshape has another user
        n7, s7 = ops.fused_add_rms_norm(seen, s6, w, 1e-5)
        return n7 + shared + seen, s7


def test_fused_only_where_exact():
    import autodeploy.distributed.all_reduce_norm  # noqa: F401
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    args = (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8))
    gm = torch.export.export(_Pairs(), args).module()
    optimizer = InferenceOptimizer({"fuse_allreduce_residual_rmsnorm": {"stage": "post_load_fusion"}})
    gm = optimizer(BuildContext(world_size=2), gm)
    ops = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert ops[FUSED] == 3 and ops[ALL_REDUCE] == 3 and ops[ADD_NORM] == 4
    first, second, third = [n for n in gm.graph.nodes if str(n.target) == FUSED]
    # the second pair had its all-reduce in the residual slot: the fused op reduces n1 and adds s1
    assert second.args[0].args == (first, 0) and second.args[1].args == (first, 1)
    # the third reduces n5 reshaped to [24] and back to [3, 8]: the reshapes moved before it
    assert "view" in str(third.args[0].target) and tuple(third.args[0].meta["val"].shape) == (3, 8)
    assert next(r for r in optimizer.report if r.name == "fuse_allreduce_residual_rmsnorm").num_matches == 3


def test_max_bytes_must_not_be_negative():
    from autodeploy.transforms.interface import build_config

    assert build_config("fuse_allreduce_residual_rmsnorm", {"stage": "post_load_fusion"}).max_bytes == 1 << 20
    with pytest.raises(ValueError, match="max_bytes=-1 must be >= 0"):
        build_config("fuse_allreduce_residual_rmsnorm", {"stage": "post_load_fusion", "max_bytes": -1})
