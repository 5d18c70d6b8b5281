"""The cached graph with gather_last_token_logits: one logits row per sequence, in batch order,
equal to the last-token rows of the same graph without the gather; a pipeline that gathers but
forgets insert_cached_last_tokens fails the cache checks instead of returning wrong rows."""

import pytest
import torch

from tiny_deployment import MAX_BATCH_SIZE, MAX_SEQ_LEN, PAGE_SIZE, PIPELINE


def _build(pipeline):
    from transformers import AutoModelForCausalLM

    from autodeploy.export.export import export_to_gm
    from autodeploy.models.tiny import ensure_tiny_model
    from autodeploy.runtime.kv_cache import CacheInterface
    from autodeploy.transforms.interface import BuildContext
    from autodeploy.transforms.optimizer import InferenceOptimizer

    hf = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny_llama"), dtype=torch.float32).eval()
    gm = export_to_gm(hf, max_batch_size=MAX_BATCH_SIZE, max_seq_len=MAX_SEQ_LEN)
    cache = CacheInterface(MAX_BATCH_SIZE, MAX_SEQ_LEN, None, PAGE_SIZE, "cpu")
    return InferenceOptimizer(pipeline)(BuildContext(cache=cache), model=gm), cache


def test_one_row_per_sequence_in_batch_order(tiny_llama):
    ungathered, cache = _build({k: v for k, v in PIPELINE.items() if k != "gather_last_token_logits"})
    # a mixed batch: a fresh prompt of 5, a first chunk of 3, and a decode at position 0
    inputs = cache.info.build([[1, 5, 9, 22, 41], [7, 8, 9], [3]], [0, 0, 0], [[1], [2], [3]], [1, 2, 3])
    with torch.no_grad():
        # the graph without the gather takes no logits_idx
        full = ungathered(**{k: v for k, v in inputs.named_args.items() if k != "logits_idx"}, **cache.tensors)
        for t in cache.tensors.values():
            t.zero_()
        gathered = tiny_llama.graph(**inputs.named_args, **cache.tensors)
    assert full.shape[1] == 9 and gathered.shape[1] == 3
    torch.testing.assert_close(gathered[0], full[0, [4, 7, 8]], rtol=1e-5, atol=1e-5)


def test_gather_without_its_cache_init_transform_fails():
    pipeline = {k: v for k, v in PIPELINE.items() if k != "insert_cached_last_tokens"}
    with pytest.raises(Exception, match="insert_cached_last_tokens"):
        _build(pipeline)
