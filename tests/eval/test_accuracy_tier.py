"""The accuracy tier on tiny_llama (random weights, fp32, CPU): strided-window perplexity through
prompt_logprobs equals HF transformers' on the same weights and windows (windows longer than the
prefill chunk), compare-hf passes on our model and fails on a perturbed reference, and the CLI's
errors are one line (exit 2) before any model work."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autodeploy.config.errors import UserError
from autodeploy.eval.perplexity import hf_perplexity, perplexity, strided_windows

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "tests" / "data" / "perplexity.txt"


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (11, 4, 4), (9, 9, 3), (20, 8, 3), (5, 16, 8), (2, 2, 1)])
def test_strided_windows_score_every_token_once(n, window, stride):
    windows = strided_windows(n, window, stride)
    scored = [j for w in windows for j in range(w.first_scored, w.end)]
    # each token after the first once; with stride == window (no overlap) a window's first token has
    # no context in it, and is not scored (as in HF's method)
    unscored = {w.begin for w in windows} if stride == window else {0}
    assert sorted(scored) == [j for j in range(n) if j not in unscored]
    assert all(w.end - w.begin <= window and w.begin < w.first_scored <= w.end for w in windows)
    assert windows[-1].end == n and [w.begin for w in windows] == list(range(0, stride * len(windows), stride))


@pytest.mark.parametrize("args,match", [((10, 1, 1), "window >= 2"), ((10, 4, 5), "stride <= window"),
                                        ((10, 4, 0), "1 <= stride"), ((1, 4, 2), "at least 2")])
def test_bad_windows_are_user_errors(args, match):
    with pytest.raises(UserError, match=match):
        strided_windows(*args)


@pytest.fixture(scope="module")
def tiny():
    from autodeploy import LLM
    from autodeploy.eval.reference import hf_model

    llm = LLM("tiny_llama", device="cpu", dtype="float32", max_batch_size=4, max_seq_len=64, attn_page_size=8,
              max_num_tokens=48, prefill_chunk_size=16)
    yield llm, hf_model(llm)
    llm.shutdown()


def test_perplexity_equals_hf_on_the_same_windows(tiny):
    llm, hf = tiny
    ids = list(llm.tokenizer.encode(TEXT.read_text()))
    assert len(ids) > 1000
    for window, stride in ((64, 32), (40, 40)):  # windows longer than max_num_tokens: prefilled in chunks
        ours, ref = perplexity(llm, ids, window, stride), hf_perplexity(hf, ids, window, stride)
        assert ours.num_scored == ref.num_scored > 0.9 * len(ids)
        assert abs(ours.perplexity - ref.perplexity) / ref.perplexity < 1e-5, (ours, ref)
        assert 100 < ours.perplexity < 2000  # random weights over a 512-token vocabulary: near uniform
    with pytest.raises(UserError, match="max_seq_len=64"):
        perplexity(llm, ids, 65, 32)


def test_compare_hf_passes_and_catches_a_perturbed_reference(tiny, monkeypatch):
    from autodeploy.eval import compare_hf, reference

    llm, hf = tiny
    prompts = ["The village stood at the edge of a wide valley", [{"role": "user", "content": "Name a river."}],
               list(range(3, 53))]  # 50 tokens: more than max_num_tokens=48
    results = compare_hf.compare(llm, prompts, 12, atol=1e-4)
    assert all(r.ok(1e-4) for r in results) and [len(r.ours) for r in results] == [12] * 3
    assert max(max(r.max_diff_prompt, r.max_diff_output) for r in results) < 1e-4
    assert "36 of 36 greedy tokens equal" in compare_hf.report(results, 1e-4, "t")
    # the same check against a reference whose LM head is off by a little: it must fail
    model = reference.hf_model(llm)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.05)
    monkeypatch.setattr(reference, "hf_model", lambda _llm: model)
    bad = compare_hf.compare(llm, prompts, 12, atol=1e-4)
    assert not any(r.ok(1e-4) for r in bad) and "MISMATCH" in compare_hf.report(bad, 1e-4, "t")


def _eval_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "autodeploy.eval", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_perplexity_and_compare_hf(tmp_path, capsys):
    """The commands' code path in this process (a subprocess per command doubled the test's time;
    the error cases below run as a user does)."""
    from autodeploy.eval.__main__ import main

    out = tmp_path / "ppl.json"
    assert main(["perplexity", "--model", "tiny_llama", "--text", str(TEXT), "--window", "48", "--stride", "24",
                 "--hf", "--json", str(out), "args.device=cpu", "--args.max-num-tokens=32"]) == 0
    data = json.loads(out.read_text())
    assert data["window"] == 48 and abs(data["perplexity"] - data["hf_perplexity"]) / data["hf_perplexity"] < 1e-5
    printed = capsys.readouterr().out
    assert "| autodeploy |" in printed and "| HF transformers |" in printed
    assert math.isclose(math.log(data["perplexity"]), data["nll"], rel_tol=1e-9)
    assert main(["compare-hf", "--model", "tiny_llama", "--max-tokens", "6", "args.device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert "24 of 24 greedy tokens equal" in printed and "MISMATCH" not in printed


@pytest.mark.parametrize("args,message", [
    (["perplexity", "--model", "tiny_llama", "--text", "no/such/file.txt"], "--text no/such/file.txt: no such file"),
    (["perplexity", "--model", "tiny_llama", "--text", str(TEXT), "--window", "8", "--stride", "9"], "stride <= window"),
    (["perplexity", "--model", "no_such_model_xyz", "--text", str(TEXT)], "no_such_model_xyz"),
    (["compare-hf", "--model", "tiny_llama", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["compare-hf", "--model", "tiny_llama", "args.no_such_key=1"], "no_such_key"),
])
def test_cli_user_errors_are_one_line(args, message):
    proc = _eval_cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], proc.stderr
