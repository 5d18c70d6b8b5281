"""The default pipeline on the second-wave families, as a user runs it, against HF.

Each family (a tiny random model from its config class, see hf_zoo.py) is saved as a checkpoint
and built by ``build_engine`` from the composed default config: meta build, export (with the
export patches), matchers, weight loading from the checkpoint, cached attention / SSM state,
compile (torch-simple on CPU). The cached graph's prefill logits must equal HF eager and the
engine's greedy tokens HF ``generate``, with prompts longer than the SSM chunk (16) and a token
budget that splits the longest prompt into prefill chunks.
"""

from __future__ import annotations

import pytest
import torch

from hf_zoo import build_hf_model

FAMILIES = ["falcon", "apertus", "dbrx", "jamba", "falcon_h1", "zamba2", "lfm2"]
MAX_NUM_TOKENS = 48
PROMPT_LENGTHS = (40, 5, 1, 23)  # 40 > the token budget of a step / 2, and > 2 SSM chunks


class Built:
    def __init__(self, name: str, checkpoint_dir):
        from autodeploy.build import build_engine
        from autodeploy.config import compose_experiment, experiment

        self.hf = build_hf_model(name)
        self.hf.save_pretrained(str(checkpoint_dir))
        cfg = compose_experiment([
            f"model={checkpoint_dir}", "args.device=cpu", "args.dtype=float32", "args.skip_tokenizer_init=true",
            "args.max_batch_size=4", "args.max_seq_len=96", "args.attn_page_size=8",
            f"args.max_num_tokens={MAX_NUM_TOKENS}",
            "args.transforms.gather_last_token_logits.enabled=false",  # every token's logits, to compare with HF's
        ])
        self.built = build_engine(experiment(cfg).args, progress=False)
        self.engine = self.built.engine
        gen = torch.Generator().manual_seed(5)
        vocab = self.hf.config.vocab_size
        self.prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]

    def cached_prefill_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """One flattened prefill step of ``prompts`` through the cached graph: logits [1, T, V]."""
        cache = self.engine.cache
        pages = [cache.allocate_pages(cache.pages_needed(len(p))) for p in prompts]
        slots = [cache.allocate_slot() for _ in prompts]
        try:
            inputs = cache.info.build(prompts, [0] * len(prompts), pages, slots)
            with torch.no_grad():
                out = self.engine.forward(inputs)
        finally:
            for p in pages:
                cache.free_pages(p)
            for s in slots:
                cache.free_slot(s)
        return out if isinstance(out, torch.Tensor) else out["logits"]

    @torch.no_grad()
    def hf_greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    return Built(request.param, tmp_path_factory.mktemp(request.param))


def test_built_with_the_default_pipeline(family):
    rows = {r["name"]: r for r in family.built.report}
    assert all(r["error"] is None for r in rows.values())
    assert rows["export_to_gm"]["num_matches"] == 1 and rows["load_weights"]["num_matches"] == 1
    assert rows["initialize_cache"]["num_matches"] > 0


def test_cached_prefill_logits_equal_hf_eager(family):
    prompts = family.prompts[:3]  # 40 + 5 + 1 tokens in one flattened step
    logits = family.cached_prefill_logits(prompts)
    offset = 0
    for prompt in prompts:
        with torch.no_grad():
            expected = family.hf(input_ids=torch.tensor([prompt])).logits[0]
        got = logits[0, offset:offset + len(prompt)]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"prompt of {len(prompt)} tokens")
        offset += len(prompt)


def test_greedy_generation_equals_hf_generate(family):
    from autodeploy.runtime.sampling_params import SamplingParams

    outs = family.engine.generate(family.prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.error for o in outs] == [None] * len(outs)
    assert [o.token_ids for o in outs] == [family.hf_greedy(p, 8) for p in family.prompts]


def test_a_sequence_conv_left_as_plain_code_fails_the_build():
    # without the export patch, LFM2's short conv stays an aten conv1d: in a flattened batch it
    # would mix sequences and forget each sequence's history, so cache_init must refuse it
    from autodeploy.export.export import export_to_gm
    from autodeploy.export.patches import patches_for
    from autodeploy.runtime.kv_cache import CacheInterface
    from autodeploy.transforms.interface import BuildContext, TransformError
    from autodeploy.transforms.optimizer import InferenceOptimizer
    from hf_zoo import PATTERN_PIPELINE

    hf = build_hf_model("lfm2")
    others = [p.name for p in patches_for(hf) if p.name != "ssm_helper_ops"]
    gm = export_to_gm(hf, max_batch_size=2, max_seq_len=32, patches=others)
    pipeline = {**PATTERN_PIPELINE, "insert_cached_attention": {"stage": "cache_init", "backend": "torch"},
                "insert_cached_ssm": {"stage": "cache_init"}, "initialize_cache": {"stage": "cache_init"}}
    ctx = BuildContext(cache=CacheInterface(2, 32, None, 8, "cpu"))
    with pytest.raises(TransformError, match=r"uncached sequence ops \(1 x convolution\); a convolution is plain graph "
                                             r"code \(no export patch made it autodeploy::causal_conv1d\)"):
        InferenceOptimizer(pipeline)(ctx, model=gm)
