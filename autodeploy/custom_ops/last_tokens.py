"""``autodeploy::last_tokens``: the hidden state of each sequence's last token, ``x[:, -1:]``.

The ``gather_last_token_logits`` transform puts it before ``lm_head``, so the head (the largest
GEMM of a prefill, and a ``[tokens, vocab]`` output) only runs for the tokens that are sampled.
It is a sequence op like attention: in the runtime's flattened batch (docs/architecture.md) the
rows to keep are the graph input ``logits_idx`` (the last tokens, ``cu_seqlen[1:] - 1``, or every
token of a request that asks for prompt logprobs), so ``insert_cached_last_tokens`` (stage
cache_init) replaces it with that index_select, and a graph that still holds it fails the cache checks.
"""

import torch


@torch.library.custom_op("autodeploy::last_tokens", mutates_args=())
def last_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x [B, S, ...] -> [B, 1, ...]``."""
    return x[:, -1:].clone()


@last_tokens.register_fake
def _last_tokens_fake(x):
    return x.new_empty((x.shape[0], 1, *x.shape[2:]))

