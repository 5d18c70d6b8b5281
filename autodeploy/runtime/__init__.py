"""The runtime: KV cache manager, flattened-batch metadata, scheduler, sampler and engine.

    cache = CacheInterface.from_args(args, device)       # ctx.cache during the build
    ... transforms (insert_cached_*, initialize_cache, resize_kv_cache) fill and size it ...
    engine = Engine(model, cache, tokenizer, eos_token_id=...)
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
"""

from .engine import Engine
from .kv_cache import CacheInterface, CacheSpec
from .outputs import RequestMetrics, RequestOutput
from .sampling_params import SamplingParams
from .sequence_info import METADATA_NAMES, BatchInputs, SequenceInfo

__all__ = [
    "BatchInputs", "CacheInterface", "CacheSpec", "Engine", "METADATA_NAMES", "RequestMetrics",
    "RequestOutput", "SamplingParams", "SequenceInfo",
]
