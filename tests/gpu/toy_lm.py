"""A two-layer attention LM traced to an fx graph with the runtime's cached inputs, and a tiny
paged-batch builder: enough to test compile backends without the export pipeline. Imports torch
and the attention backend modules only."""

from __future__ import annotations

import torch
from torch import fx, nn

from autodeploy.config.schema import AutoDeployArgs
from autodeploy.transforms.interface import BuildContext

CACHE_NAMES = ("k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1")


class ToyAttnLM(nn.Module):
    def __init__(self, op_name="torch_cached_attention", vocab=97, hidden=64, heads=4, kv_heads=2, head_dim=16,
                 max_pos=512, sliding_window=None):
        super().__init__()
        self.op_name, self.h, self.kv, self.d, self.window = op_name, heads, kv_heads, head_dim, sliding_window
        self.emb = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim) for _ in range(2))
        self.o = nn.ModuleList(nn.Linear(heads * head_dim, hidden) for _ in range(2))
        self.head = nn.Linear(hidden, vocab)

    def _attn(self, i, x, seq_len, input_pos, cu_seqlen, page_table, kc, vc):
        op = getattr(torch.ops.autodeploy, self.op_name)
        qkv = self.qkv[i](x)
        q = qkv[..., : self.h * self.d].view(1, -1, self.h, self.d)
        k = qkv[..., self.h * self.d: (self.h + self.kv) * self.d].view(1, -1, self.kv, self.d)
        v = qkv[..., (self.h + self.kv) * self.d:].view(1, -1, self.kv, self.d)
        a = op(q, k, v, seq_len, input_pos, cu_seqlen, page_table, kc, vc, self.d**-0.5, self.window, None)
        return x + self.o[i](a.flatten(2))

    def forward(self, input_ids, position_ids, seq_len, input_pos, cu_seqlen, page_table,
                k_cache_0, v_cache_0, k_cache_1, v_cache_1):
        x = self.emb(input_ids) + self.pos(position_ids)
        x = self._attn(0, x, seq_len, input_pos, cu_seqlen, page_table, k_cache_0, v_cache_0)
        x = self._attn(1, x, seq_len, input_pos, cu_seqlen, page_table, k_cache_1, v_cache_1)
        return self.head(x)


def toy_graph(op_name="torch_cached_attention", device="cpu", dtype=torch.float32, seed=0, **kw) -> fx.GraphModule:
    from autodeploy.custom_ops.cached_attention import _load_builtin

    _load_builtin()  # registers every backend's op (imports torch only)
    torch.manual_seed(seed)
    model = ToyAttnLM(op_name, **kw).to(device=device, dtype=dtype).eval()
    return fx.symbolic_trace(model)


def toy_caches(num_pages=40, page_size=8, kv_heads=2, head_dim=16, device="cpu", dtype=torch.float32):
    return {n: torch.zeros((num_pages, page_size, kv_heads, head_dim), device=device, dtype=dtype)
            for n in CACHE_NAMES}


class PagedBatcher:
    """Hands out pages (page 0 is scratch, like the runtime) and builds flattened batches."""

    def __init__(self, page_size=8, max_pages_per_seq=8, device="cpu"):
        self.ps, self.P, self.device = page_size, max_pages_per_seq, device
        self.next_page = 1
        self.pages: dict[int, list[int]] = {}
        self.length: dict[int, int] = {}

    def batch(self, new_tokens: dict[int, list[int]]):
        """``new_tokens``: seq id -> its new tokens (prefills first, then decodes)."""
        ids, pos, seq_len, input_pos, table = [], [], [], [], []
        for sid, toks in new_tokens.items():
            start = self.length.get(sid, 0)
            pages = self.pages.setdefault(sid, [])
            while len(pages) * self.ps < start + len(toks):
                pages.append(self.next_page)
                self.next_page += 1
            ids += toks
            pos += range(start, start + len(toks))
            seq_len.append(len(toks))
            input_pos.append(start)
            table.append(pages + [0] * (self.P - len(pages)))
            self.length[sid] = start + len(toks)
        i32 = dict(dtype=torch.int32, device=self.device)
        sl = torch.tensor(seq_len, **i32)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.int64, device=self.device),
            "position_ids": torch.tensor([pos], dtype=torch.int64, device=self.device),
            "seq_len": sl,
            "input_pos": torch.tensor(input_pos, **i32),
            "cu_seqlen": torch.cat([torch.zeros(1, **i32), sl.cumsum(0).to(torch.int32)]),
            "page_table": torch.tensor(table, **i32),
        }


# (prefill step, then decode steps of changing batch sizes, a mixed step, more decodes)
PROMPTS = {0: 5, 1: 9, 2: 1, 3: 17, 4: 3, 5: 12}
DECODE_STEPS = [[0, 1, 2, 3, 4, 5], [0, 1, 2], [4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [5, 3]]


def apply_compile(gm, device, cache=None, max_batch_size=8, **opts):
    """The compile_model transform (its class directly: no omegaconf needed on the GPU machine)."""
    from autodeploy.transforms.library.compile_model import CompileModel, CompileModelConfig

    ctx = BuildContext(args=AutoDeployArgs(max_batch_size=max_batch_size), device=torch.device(device), cache=cache)
    return CompileModel(CompileModelConfig(**opts)).apply(gm, ctx)


def schedule(gen: torch.Generator):
    """Yields {seq id: new tokens} for every step: prefill, decodes, a mixed step, decodes."""

    def tok(n):
        return torch.randint(0, 97, (n,), generator=gen).tolist()

    yield {s: tok(n) for s, n in PROMPTS.items()}
    for seqs in DECODE_STEPS[:3]:
        yield {s: tok(1) for s in seqs}
    yield {6: tok(7), 0: tok(1), 1: tok(1)}  # mixed: a prefill, then decodes
    for seqs in DECODE_STEPS[3:] + [[0, 1, 6]]:
        yield {s: tok(1) for s in seqs}


def run_both(reference, candidate, device, dtype=torch.float32, num_pages=48):
    """Runs the schedule through both models on their own caches; returns per-step outputs and caches."""
    caches_ref = toy_caches(num_pages, device=device, dtype=dtype)
    caches_new = {n: t.clone() for n, t in caches_ref.items()}
    b_ref, b_new = PagedBatcher(device=device), PagedBatcher(device=device)
    outs = []
    with torch.inference_mode():
        for step in schedule(torch.Generator().manual_seed(0)):
            out_ref = reference(**b_ref.batch(step), **caches_ref)
            out_new = candidate(**b_new.batch(step), **caches_new)
            outs.append((out_ref.float().clone(), out_new.float().clone()))
    return outs, caches_ref, caches_new


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()
