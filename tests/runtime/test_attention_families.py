"""Attention variants end to end through the default pipeline (CPU, fp32, torch backend).

gpt-oss (learned sinks, alternating sliding window 4), BLOOM (ALiBi) and Llama-4 text
(chunk-local attention, chunks of 4, next to full-attention NoPE layers): tiny random models from
``tests/transforms/hf_zoo.py`` saved to a directory and built the way ``launch.py model=DIR``
builds them. The cached graph's logits equal HF eager on a batch that mixes prefills and decodes,
and greedy generation equals HF ``generate``, with prompts longer than any window or chunk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transforms"))
from hf_zoo import build_hf_model  # noqa: E402

from autodeploy.runtime.sampling_params import SamplingParams  # noqa: E402

FAMILIES = ["gpt_oss", "bloom", "llama4_text"]
# 13 and 21 tokens: several windows / chunks of 4 and pages of 8
PROMPTS = [[1, 5, 9, 22, 41, 7, 3, 88, 17, 60, 4, 31, 12], [1, 3], list(range(3, 24)), [1, 100, 100, 7, 9]]


class Deployment:
    def __init__(self, name: str, directory: Path, *overrides: str):
        from autodeploy.build import build_engine
        from autodeploy.config import compose_experiment, experiment

        self.hf = build_hf_model(name)
        self.hf.save_pretrained(directory)
        cfg = compose_experiment([
            f"model={directory}", "args.device=cpu", "args.dtype=float32", "args.skip_tokenizer_init=true",
            "transforms/compile=torch-simple", "args.max_seq_len=64", "args.max_batch_size=4", "args.attn_page_size=8",
            # every token's logits, to compare them all with HF's
            "args.transforms.gather_last_token_logits.enabled=false",
            *overrides,
        ])
        self.built = build_engine(experiment(cfg).args, progress=False)
        self.report = {r["name"]: r for r in self.built.report}
        self._greedy: dict[tuple[int, ...], list[int]] = {}

    @torch.no_grad()
    def hf_logits(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids])
        return self.hf(input_ids=t, position_ids=torch.arange(len(ids))[None]).logits[0]

    @torch.no_grad()
    def hf_greedy(self, ids: list[int], n: int) -> list[int]:
        key = tuple(ids)
        if len(self._greedy.get(key, ())) < n:  # HF generate is the slow part: reuse longer runs
            t = torch.tensor([ids])
            out = self.hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
            self._greedy[key] = out[0, len(ids):].tolist()
        return self._greedy[key][:n]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    return Deployment(request.param, tmp_path_factory.mktemp(request.param))


def test_every_attention_is_cached(family):
    assert family.report["match_attention_pattern"]["num_matches"] == 2
    assert family.report["match_attention_pattern"].get("note", "") == ""
    assert family.report["insert_cached_attention"]["num_matches"] == 2


def test_cached_graph_logits_equal_hf_eager(family):
    """One step with three prefills, then one with their decodes and a new prefill: every position."""
    engine = family.built.engine
    cache = engine.cache
    prompts = PROMPTS[:3]
    pages = [cache.allocate_pages(-(-(len(p) + 2) // cache.page_size)) for p in prompts + [PROMPTS[3]]]
    try:
        def run(tokens, input_pos, seqs):
            inputs = cache.info.build(tokens, input_pos, [pages[i] for i in seqs], [0] * len(seqs))
            with torch.inference_mode():
                return engine.forward(inputs)[0]

        out = run(prompts, [0] * 3, [0, 1, 2])
        start = 0
        for p in prompts:
            torch.testing.assert_close(out[start: start + len(p)], family.hf_logits(p), rtol=0, atol=2e-5)
            start += len(p)
        nxt = [7, 11, 13]
        out = run([[t] for t in nxt] + [PROMPTS[3]], [len(p) for p in prompts] + [0], [0, 1, 2, 3])
        for i, (p, t) in enumerate(zip(prompts, nxt)):
            torch.testing.assert_close(out[i], family.hf_logits(p + [t])[-1], rtol=0, atol=2e-5)
        torch.testing.assert_close(out[3:], family.hf_logits(PROMPTS[3]), rtol=0, atol=2e-5)
    finally:
        for p in pages:
            cache.free_pages(p)


def test_greedy_generation_equals_hf_generate(family):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = family.built.engine.generate(PROMPTS, sp)
    assert [o.error for o in outs] == [None] * len(PROMPTS)
    expected = [family.hf_greedy(p, 12) for p in PROMPTS]
    assert [o.token_ids for o in outs] == expected
    assert len({tuple(e) for e in expected}) == len(PROMPTS)  # distinct continuations: a real comparison


def test_chunked_prefill_equals_hf_generate(family):
    """A token budget of 5 splits prompts into chunks that start inside a window or chunk."""
    from autodeploy.runtime.engine import Engine
    from autodeploy.runtime.kv_cache import CacheInterface

    base = family.built.engine.cache
    cache = CacheInterface(max_batch_size=4, max_seq_len=64, max_num_tokens=5, page_size=8, device="cpu")
    for spec in base.specs.values():
        cache.add_cache(spec)
    cache.initialize()
    engine = Engine(family.built.engine.model, cache, None, eos_token_id=None)
    outs = engine.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == [family.hf_greedy(p, 6) for p in PROMPTS[:3]]
