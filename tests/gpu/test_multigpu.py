"""Collectives and multi-rank runs on two GPUs (NCCL): the one-shot symmetric-memory all-reduce
and the one-kernel all-reduce + add + RMSNorm against NCCL, TP/EP over two GPUs against one, and a
world_size larger than the GPUs.

Run on a machine with 2+ GPUs: ``pytest -m multigpu tests/gpu/test_multigpu.py`` or
``bash scripts/gpu_validate.sh multigpu``; skipped with fewer GPUs (tests/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multigpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_one_shot_all_reduce_gives_nccls_logits(dtype):
    """For two ranks both sum the same two values once (a + b is exact to round): equal bits.
    The torch sources checked dispatch the one-shot kernel for bfloat16 and float32 only: a float16
    model must then run with every all-reduce on NCCL, not fail on its first decode."""
    from multigpu_ranks import run

    found = run(2, dtype)
    assert len(found) == 2
    for rank, f in enumerate(found):
        assert f["groups"] == ["0,1"], f"rank {rank}: the one-shot all-reduce was not set up (see the log's warning)"
        assert f["all_reduces_per_forward"] >= 2, f
        if dtype == "bfloat16":
            assert f["kernel_takes_dtype"], f
        # every all-reduce of every forward took the one-shot path (if the kernel takes the dtype), none of the NCCL run
        expected = f["all_reduces_per_forward"] * f["forwards"] if f["kernel_takes_dtype"] else 0
        assert f["one_shot_calls"] == expected, f
        assert f["one_shot_calls_in_nccl_run"] == 0, f
        assert f["unequal"] == [], f"rank {rank}: logits differ in forwards {f['unequal']} (max {f['max_abs_diff']})"
    assert found[0]["relative_error_vs_hf_fp32"] < 0.05, found[0]


def _random_prompts(lengths, seed=0, vocab=512):
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("name,extra", [
    ("tiny_llama", {}),  # tensor parallel
    ("tiny_mixtral", {"transforms": {"detect_sharding": {"sharding_dims": ["tp", "ep"]}}}),  # expert parallel
])
def test_two_gpus_greedy_equals_one_gpu_in_fp32(name, extra):
    """The default GPU path (CUDA graphs with the one-shot all-reduce captured in them, NCCL for
    large messages) over prompts past every threshold: a 700-token prompt prefilled in chunks of
    128 beside decodes, MoE steps above and below 64 tokens, many KV pages."""
    from autodeploy import LLM, SamplingParams

    kwargs = dict(device="cuda", dtype="float32", max_batch_size=4, max_seq_len=1024, attn_page_size=16,
                  max_num_tokens=512, prefill_chunk_size=128, compile_backend="torch-cudagraph")
    prompts = _random_prompts([700, 150, 13, 6])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(name, world_size=1, **kwargs) as one:
        expected = [o.token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    with LLM(name, world_size=2, **kwargs, **extra) as two:
        assert len(two.ranks.procs) == 1 and two.ranks.device.type == "cuda"
        assert any(r.strategy != "replicate" for r in two.sharding_plan.rows())
        got = [o.token_ids for o in two.generate(prompts, params, use_tqdm=False)]
    assert got == expected


def test_more_ranks_than_gpus_fail_in_preflight():
    gpus = torch.cuda.device_count()
    proc = subprocess.run([sys.executable, "launch.py", "model=tiny_llama", f"args.world_size={gpus + 1}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: args.world_size={gpus + 1} needs {gpus + 1} GPUs (one per rank) but {gpus} are "
                      "visible: lower args.world_size, make more GPUs visible (CUDA_VISIBLE_DEVICES), or use "
                      "args.device=cpu"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_all_reduce_add_rms_norm_one_kernel_equals_the_two_ops(dtype):
    """The fused op's one kernel over symmetric memory against NCCL's all-reduce then the add+norm
    op, eagerly at decode sizes and past its 1 MiB buffer (the two ops), and from a CUDA graph
    replayed with new inputs. Two ranks sum a + b once either way (the sums are expected bit for
    bit, ``sum_equal``); checked within bf16's rounding, as the kernels' variance sums may differ in order."""
    from fused_norm_ranks import run

    tol = 1e-5 if dtype == "float32" else 8e-3
    for rank, f in enumerate(run(2, dtype)):
        assert f["groups"] == ["0,1"], f"rank {rank}: the one kernel was not set up (its self-check failed; see the log)"
        for e in f["eager"]:
            nbytes = e["rows"] * 4096 * (2 if dtype == "bfloat16" else 4)
            assert e["kernel"] == (nbytes <= 1 << 20), e
            assert e["sum_rel_err"] < tol and e["normed_rel_err"] < tol, (rank, e)
        assert len(f["replays"]) == 5 and f["kernel_calls_in_replays"] == 0
        for r in f["replays"]:
            assert r["sum_rel_err"] < tol and r["normed_rel_err"] < tol, (rank, r)


def test_fused_all_reduce_norm_in_cuda_graphs_gives_the_unfused_tokens():
    """tiny_llama over two GPUs with torch-cudagraph (decode graphs hold the one kernel), the fusion
    on and off, fp32: the same greedy tokens over prompts past the chunk size and many KV pages;
    the fused build used the one kernel."""
    from autodeploy import LLM, SamplingParams

    kwargs = dict(device="cuda", dtype="float32", max_batch_size=4, max_seq_len=1024, attn_page_size=16,
                  max_num_tokens=512, prefill_chunk_size=128, compile_backend="torch-cudagraph")
    prompts = _random_prompts([700, 150, 13, 6])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    off = {"transforms": {"fuse_allreduce_residual_rmsnorm": {"enabled": False}}}
    with LLM("tiny_llama", world_size=2, **kwargs, **off) as llm:
        expected = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM("tiny_llama", world_size=2, **kwargs) as llm:
        row = next(r for r in llm.build_report if r["name"] == "fuse_allreduce_residual_rmsnorm")
        assert row["num_matches"] == 4 and "one kernel over symmetric memory" in row["note"], row
        got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
