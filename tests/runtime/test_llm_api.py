"""``LLM(model=...).generate`` through the real config and the default pipeline (CPU, torch backend)."""

import pytest
import torch

from autodeploy import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny_llama", device="cpu", max_batch_size=4, max_seq_len=64, attn_page_size=16)


def test_generate_matches_hf_and_keeps_order(llm):
    from transformers import AutoModelForCausalLM

    from autodeploy.models.tiny import ensure_tiny_model

    hf = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny_llama"), dtype=torch.float32).eval()
    prompts = ["The capital of France is", [{"role": "user", "content": "Say hi."}], [1, 40, 41, 42]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref and out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_bad_request_fails_alone(llm):
    outs = llm.generate(["Hello", "", "Hello"], [SamplingParams(temperature=0, max_tokens=4),
                                                 SamplingParams(), SamplingParams(temperature=0, max_tokens=4)])
    assert outs[1].finish_reason == "error" and "empty prompt" in outs[1].error
    assert outs[0].token_ids == outs[2].token_ids and len(outs[0].token_ids) <= 4


def test_stream(llm):
    outs = list(llm.stream(["Hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))
    assert [len(o.token_ids) for o in outs] == [1, 2, 3] and outs[-1].finished
