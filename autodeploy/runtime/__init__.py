"""The runtime: KV cache manager, flattened-batch metadata, scheduler, sampler and engine.

    cache = CacheInterface.from_args(args, device)       # ctx.cache during the build
    ... transforms (insert_cached_*, initialize_cache, resize_kv_cache) fill and size it ...
    engine = Engine(model, cache, tokenizer, eos_token_id=...)
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
"""

import importlib

# lazy, so `from autodeploy.runtime.sampling_params import SamplingParams` does not import torch
_EXPORTS = {
    "Engine": "engine",
    "CacheInterface": "kv_cache",
    "CacheSpec": "kv_cache",
    "Logprob": "outputs",
    "RequestMetrics": "outputs",
    "RequestOutput": "outputs",
    "SamplingParams": "sampling_params",
    "SequenceInfo": "sequence_info",
    "BatchInputs": "sequence_info",
    "METADATA_NAMES": "sequence_info",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
