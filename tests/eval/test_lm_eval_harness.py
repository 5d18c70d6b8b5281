"""The lm-evaluation-harness model class against lm-eval itself (``simple_evaluate``), offline: three
local YAML tasks over JSONL files in tests/data/lm_eval (multiple choice -> ``loglikelihood``,
perplexity -> ``loglikelihood_rolling``, generation -> ``generate_until``), each response equal to HF
transformers on the same weights and the same token windows."""

import math
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
TASKS = {
    "ad_choice": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
    "ad_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "ad_generate": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
FILES = {"ad_choice": "choice.jsonl", "ad_rolling": "rolling.jsonl", "ad_generate": "generate.jsonl"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    from autodeploy import LLM
    from autodeploy.eval.harness import AutoDeployLM
    from autodeploy.eval.reference import hf_model

    tasks = tmp_path_factory.mktemp("tasks")
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA / FILES[name]}\n"
            f"test_split: test\n{body}")
    # max_seq_len 48: the long document takes several rolling windows, each prefilled in chunks of 32
    llm = LLM("tiny_llama", device="cpu", dtype="float32", max_batch_size=4, max_seq_len=48, attn_page_size=8,
              max_num_tokens=32)
    lm = AutoDeployLM(llm=llm)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    yield lm, results, hf_model(llm)
    llm.shutdown()


def _hf_sum(hf, context, continuation):
    from autodeploy.eval.reference import hf_logprobs

    ref = hf_logprobs(hf, context + continuation)
    rows = [ref[len(context) - 1 + i] for i in range(len(continuation))]
    return sum(float(r[t]) for r, t in zip(rows, continuation)), all(int(r.argmax()) == t for r, t in zip(rows, continuation))


def test_registered_as_autodeploy():
    from lm_eval.api.registry import get_model

    from autodeploy.eval.harness import AutoDeployLM

    # lm-eval's own models are still found beside ours
    assert get_model("autodeploy") is AutoDeployLM and get_model("dummy").__name__ == "DummyLM"


def test_loglikelihood_equals_hf(evaluated):
    lm, results, hf = evaluated
    samples = results["samples"]["ad_choice"]
    assert len(samples) == 4 and 0.0 <= results["results"]["ad_choice"]["acc,none"] <= 1.0
    for sample in samples:
        assert len(sample["resps"]) == len(sample["doc"]["choices"])
        for (context, continuation), [(logprob, greedy)] in zip(sample["arguments"], sample["resps"]):
            want, want_greedy = _hf_sum(hf, *lm._encode_pair(context, continuation))
            assert abs(logprob - want) < 1e-4 and greedy == want_greedy


def test_loglikelihood_rolling_equals_hf_over_the_same_windows(evaluated):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm, results, hf = evaluated
    samples = results["samples"]["ad_rolling"]
    assert math.isfinite(results["results"]["ad_rolling"]["word_perplexity,none"])
    windows_per_doc = []
    for sample in samples:
        tokens = lm.tok_encode(sample["arguments"][0][0])
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, lm.prefix_token_id,
                                                                              lm.max_length, context_len=1)]
        windows_per_doc.append(len(windows))
        want = sum(_hf_sum(hf, context, continuation)[0] for context, continuation in windows)
        assert abs(sample["resps"][0][0] - want) < 1e-3
    assert max(windows_per_doc) >= 2  # a document longer than the model's context


def test_generate_until_equals_hf_greedy(evaluated):
    from autodeploy.eval.reference import hf_greedy

    lm, results, hf = evaluated
    samples = results["samples"]["ad_generate"]
    assert len(samples) == 3 and "exact_match,none" in results["results"]["ad_generate"]
    eos = lm.tokenizer.eos_token_id
    for sample in samples:
        context, kwargs = sample["arguments"][0]
        tokens = hf_greedy(hf, lm.tok_encode(context), kwargs["max_gen_toks"])
        tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
        want = lm.tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0]
        assert sample["resps"][0][0] == want
    assert any(sample["resps"][0][0] for sample in samples)  # something was generated


def test_sampling_kwargs_map_to_sampling_params(evaluated):
    lm = evaluated[0]
    greedy = lm._sampling_params({"until": "Q:", "max_gen_toks": 5, "temperature": 0.7})
    assert greedy.temperature == 0 and greedy.stop == ["Q:"] and greedy.max_tokens == 5
    sampled = lm._sampling_params({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 3})
    assert sampled.temperature == 0.7 and sampled.top_p == 0.9 and sampled.seed == 3 and sampled.max_tokens == 256
    assert lm.max_length == 47  # max_seq_len - 1: a window of max_length + 1 tokens fits one request
