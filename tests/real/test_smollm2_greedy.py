"""The real default model (SmolLM2-135M-Instruct, float32, CPU) gives HF's greedy tokens: 8 prompts
x 32 tokens, among them a chat and one of more than 256 tokens (five KV pages), unsharded and on
2 ranks (9 query / 3 KV heads do not divide by 2, so the plan must stay exact), the 2-rank run
also with chunked prefill (chunks of 128 tokens)."""

from __future__ import annotations

import pytest
from conftest import SMOLLM2, hf_greedy

NUM_TOKENS = 32
LONG = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined several existing technologies into a single working system. Movable type had been "
    "used in East Asia for centuries, but the scripts there contained thousands of characters, which made the "
    "method slow and expensive. Gutenberg's alphabet needed only a few dozen letters, so a printer could cast "
    "many copies of each one from a metal alloy of lead, tin and antimony. He also adapted the screw press that "
    "farmers used to make wine and olive oil, and he developed an oil-based ink that stuck to metal instead of "
    "running off it. By about 1455 his workshop had finished a Bible of roughly thirteen hundred pages, and "
    "within fifty years presses were working in more than two hundred European cities. Books became cheaper, "
    "literacy spread, and scholars could compare identical copies of the same text for the first time. Some "
    "historians argue that the Reformation, the scientific revolution and the rise of newspapers would have "
    "been impossible without it. Others point out that printers also spread pamphlets full of rumours and "
    "propaganda, and that governments and churches soon tried to license presses, censor books and punish "
    "their authors. Either way, the speed at which ideas could travel changed for good, and the same questions "
    "about who may publish what came back with the telegraph, the radio and the internet. In a few sentences, "
    "summarize why the printing press mattered:"
)
PROMPTS = [
    "The capital of France is",
    [{"role": "user", "content": "What is the capital of France?"}],
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    LONG,
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three fruits and their colors."}],
    "The three primary colors are",
    "Water boils at a temperature of",
]


def _generate(llm):
    from autodeploy import SamplingParams

    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True))
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return outs


@pytest.fixture(scope="module")
def reference(smollm2_llm, smollm2_hf):
    """Our world_size-1 outputs and HF's greedy tokens for the same prompt ids."""
    outs = _generate(smollm2_llm)
    return outs, [hf_greedy(smollm2_hf, o.prompt_token_ids, NUM_TOKENS) for o in outs]


def _assert_equal(outs, hf_tokens):
    compared = 0
    for out, ref in zip(outs, hf_tokens):
        assert out.token_ids == ref, (out.prompt, out.token_ids, ref)
        compared += len(ref)
    assert compared == len(PROMPTS) * NUM_TOKENS


def test_prompts_cover_a_chat_and_more_than_256_tokens(reference):
    outs, _ = reference
    lengths = [len(o.prompt_token_ids) for o in outs]
    assert max(lengths) > 256 and lengths[1] > 20  # the chat template (and its system prompt) applied
    assert outs[0].text.strip().startswith("Paris")  # real weights: the model knows the capital


def test_greedy_tokens_equal_hf_world_size_1(reference):
    _assert_equal(*reference)


def test_greedy_tokens_equal_hf_world_size_2_with_chunked_prefill(reference):
    from autodeploy import LLM

    outs, hf_tokens = reference
    with LLM(SMOLLM2, world_size=2, device="cpu", dtype="float32", max_seq_len=512, max_batch_size=8,
             prefill_chunk_size=128) as llm:
        sharded = _generate(llm)
        plan = llm.sharding_plan
    assert plan is not None and {"colwise", "rowwise"} <= {row.strategy for row in plan.rows()}  # really sharded
    _assert_equal(sharded, hf_tokens)
