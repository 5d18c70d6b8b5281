"""A fake cached model and tokenizer that exercise the runtime contract without a real LM.

``PagedSumModel`` writes every input token into a paged token cache and keeps a per-slot token
count, then predicts ``(sum of the sequence's tokens * 31 + tokens seen) % vocab``. Its output is
right only if pages, positions, slots and chunking are right, so ``expected_tokens`` (plain
Python) checks the engine end to end.
"""

import torch
from torch import nn

from autodeploy.runtime.kv_cache import CacheInterface, CacheSpec

VOCAB = 97


class PagedSumModel(nn.Module):
    def __init__(self, vocab=VOCAB, sharpness=10.0, fail_on_token=None):
        super().__init__()
        self.vocab, self.sharpness, self.fail_on_token = vocab, sharpness, fail_on_token
        self.calls = []  # (num_seqs, num_tokens) per forward

    def forward(self, input_ids, position_ids, seq_len, input_pos, cu_seqlen, page_table, slot_idx,
                tok_cache, count_state):
        ids, pos = input_ids[0], position_ids[0]
        T, B = ids.numel(), seq_len.numel()
        self.calls.append((B, T))
        if self.fail_on_token is not None and bool((ids == self.fail_on_token).any()):
            raise RuntimeError("boom")
        seq = torch.repeat_interleave(torch.arange(B), seq_len.long(), output_size=T)
        ps = tok_cache.shape[1]
        tok_cache[page_table.long()[seq, pos // ps], pos % ps] = ids.double()
        slots = slot_idx.long()
        base = torch.where(input_pos == 0, torch.zeros_like(count_state[slots]), count_state[slots])
        count_state[slots] = base + seq_len.long()
        history = tok_cache[page_table.long()].flatten(1)[seq]  # [T, L]
        visible = torch.arange(history.shape[1])[None] <= pos[:, None]
        sums = (history * visible).sum(-1).long()
        seen = base[seq] + torch.arange(T) - cu_seqlen.long()[seq] + 1
        target = (sums * 31 + seen) % self.vocab
        return (torch.nn.functional.one_hot(target, self.vocab).double() * self.sharpness)[None]


def next_token(tokens, vocab=VOCAB):
    return (sum(tokens) * 31 + len(tokens)) % vocab


def prompts(lengths, start=1):
    """Token-id prompts of the given lengths (ids 1..90, different per prompt)."""
    return [[(start + 7 * i + j) % 90 + 1 for j in range(n)] for i, n in enumerate(lengths)]


def expected_tokens(prompt, n, vocab=VOCAB):
    tokens, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(tokens, vocab))
        tokens.append(out[-1])
    return out


def make_cache(max_batch_size=4, max_seq_len=64, page_size=4, max_num_tokens=None, num_pages=None):
    cache = CacheInterface(max_batch_size, max_seq_len, max_num_tokens, page_size, "cpu")
    cache.add_cache(CacheSpec("tok_cache", (page_size,), torch.float64, paged=True))
    cache.add_cache(CacheSpec("count_state", (), torch.int64, paged=False))
    cache.initialize()
    if num_pages is not None:
        cache.resize(num_pages)
    return cache


class FakeTokenizer:
    """Token id t <-> the word "w<t>"; id 0 is EOS and a special token."""

    eos_token_id = 0
    chat_template = "{% for m in messages %}{{ m.content }} {% endfor %}"

    def encode(self, text, add_special_tokens=True):
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{t}" for t in ids if not (skip_special_tokens and t == 0))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(m["content"] for m in messages) + " w1"


class ToyLM(nn.Module):
    """A small causal LM written directly with the canonical ``autodeploy::attention`` op."""

    def __init__(self, vocab=64, hidden=32, heads=4, kv_heads=2, head_dim=8, layers=2, sliding_window=None,
                 logit_cap=None, sinks=False, alibi=False, attention_chunk_size=None, index_positions=False):
        super().__init__()
        import autodeploy.custom_ops.attention  # noqa: F401  (registers the op)

        self.H, self.KV, self.D, self.sw, self.cap = heads, kv_heads, head_dim, sliding_window, logit_cap
        self.chunk = attention_chunk_size
        # HF's cache_position style: positions from arange over the sequence instead of position_ids
        self.index_positions = index_positions
        self.sinks = nn.Parameter(torch.randn(heads)) if sinks else None
        self.register_buffer("alibi_slopes", torch.rand(heads) if alibi else None)
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(256, hidden)
        self.q = nn.ModuleList(nn.Linear(hidden, heads * head_dim) for _ in range(layers))
        self.k = nn.ModuleList(nn.Linear(hidden, kv_heads * head_dim) for _ in range(layers))
        self.v = nn.ModuleList(nn.Linear(hidden, kv_heads * head_dim) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(heads * head_dim, hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, position_ids):
        B, S = input_ids.shape
        positions = torch.arange(S, device=input_ids.device) if self.index_positions else position_ids
        x = self.embed(input_ids) + self.pos(positions)
        for q, k, v, o in zip(self.q, self.k, self.v, self.o):
            a = torch.ops.autodeploy.attention(
                q(x).view(B, S, self.H, self.D), k(x).view(B, S, self.KV, self.D), v(x).view(B, S, self.KV, self.D),
                self.D ** -0.5, self.sw, self.cap, self.sinks, self.alibi_slopes, self.chunk,
            )
            x = x + o(a.reshape(B, S, -1))
        return self.head(x)

    def export(self):
        ids = torch.randint(0, 64, (2, 7))
        pos = torch.arange(7).expand(2, 7)
        b, s = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=256)
        dims = {"input_ids": {0: b, 1: s}, "position_ids": {0: b, 1: s}}
        return torch.export.export(self, (ids, pos), dynamic_shapes=dims).module()

    @torch.no_grad()
    def greedy(self, prompt, n):
        tokens = list(prompt)
        for _ in range(n):
            ids = torch.tensor([tokens])
            tokens.append(int(self(ids, torch.arange(len(tokens))[None])[0, -1].argmax()))
        return tokens[len(prompt):]
