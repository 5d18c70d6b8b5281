"""Tiny models deployed for runtime tests: exported graph -> cleanup, matchers, fusions, cache_init.

The HF model the graph came from stays as the reference for ``generate``. ``tiny(name)`` builds
once per process (export + transforms take seconds); conftest.py shares them as fixtures.
"""

from dataclasses import dataclass
from typing import Any

import torch

MAX_BATCH_SIZE = 4
MAX_SEQ_LEN = 96
PAGE_SIZE = 8

PIPELINE = {
    "cleanup_assertions": {"stage": "post_export"},
    "cleanup_noop_ops": {"stage": "post_export"},
    "match_attention_pattern": {"stage": "pattern_matcher"},
    "eliminate_redundant_transposes": {"stage": "pattern_matcher"},
    "match_rope_pattern": {"stage": "pattern_matcher"},
    "match_rmsnorm_pattern": {"stage": "pattern_matcher"},
    "match_moe_pattern": {"stage": "pattern_matcher"},
    # the post-load fusions of the default pipeline: the runtime tests run with every one on
    "fuse_add_rms_norm": {"stage": "post_load_fusion"},
    "fuse_parallel_linears": {"stage": "post_load_fusion"},
    "fuse_silu_mul": {"stage": "post_load_fusion"},
    "gather_last_token_logits": {"stage": "post_load_fusion"},
    "rope_position_tables": {"stage": "post_load_fusion"},
    "insert_cached_attention": {"stage": "cache_init", "backend": "torch"},
    "insert_cached_ssm": {"stage": "cache_init"},
    "insert_cached_last_tokens": {"stage": "cache_init"},
    "initialize_cache": {"stage": "cache_init"},
    "resize_kv_cache": {"stage": "cache_init"},
}


@dataclass
class TinyDeployment:
    name: str
    hf: Any  # the HF model (reference)
    tokenizer: Any
    graph: Any  # the cached GraphModule
    cache: Any
    report: list

    def engine(self, **limits):
        """An engine over the shared graph; ``limits`` (max_batch_size, max_num_tokens, ...) get a fresh cache."""
        from autodeploy.runtime.engine import Engine
        from autodeploy.runtime.kv_cache import CacheInterface

        cache = self.cache
        if limits:
            kw = dict(max_batch_size=cache.max_batch_size, max_seq_len=cache.max_seq_len,
                      max_num_tokens=cache.max_num_tokens, page_size=cache.page_size, device=cache.device)
            cache = CacheInterface(**{**kw, **limits})
            for spec in self.cache.specs.values():
                cache.add_cache(spec)
            cache.initialize()
        return Engine(self.graph, cache, self.tokenizer, eos_token_id=self.hf.config.eos_token_id,
                      vocab_size=self.hf.config.vocab_size)

    @torch.no_grad()
    def hf_greedy(self, prompt_ids, max_new_tokens, ignore_eos=False):
        ids = torch.tensor([prompt_ids], device=self.hf.device)
        out = self.hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None if ignore_eos else self.hf.config.eos_token_id, pad_token_id=0,
        )
        return out[0, len(prompt_ids):].tolist()


def build_tiny(name: str, device: str = "cpu", free_mem_ratio: float = 0.0) -> TinyDeployment:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autodeploy.export.export import export_to_gm
    from autodeploy.models.tiny import ensure_tiny_model
    from autodeploy.runtime.kv_cache import CacheInterface
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    path = ensure_tiny_model(name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    gm = export_to_gm(hf, max_batch_size=MAX_BATCH_SIZE, max_seq_len=MAX_SEQ_LEN)
    cache = CacheInterface(MAX_BATCH_SIZE, MAX_SEQ_LEN, None, PAGE_SIZE, device)
    pipeline = {**PIPELINE, "resize_kv_cache": {"stage": "cache_init", "free_mem_ratio": free_mem_ratio}}
    optimizer = InferenceOptimizer(pipeline)
    gm = optimizer(BuildContext(cache=cache, device=torch.device(device)), model=gm)
    return TinyDeployment(name, hf, AutoTokenizer.from_pretrained(path), gm, cache, optimizer.report)


_BUILT: dict[str, TinyDeployment] = {}


def tiny(name: str) -> TinyDeployment:
    if name not in _BUILT:
        _BUILT[name] = build_tiny(name)
    return _BUILT[name]
