"""Multi-rank runs at real sizes (CPU, gloo): prompts of 100 to 1000 tokens through expert- and
tensor-parallel ranks, greedy equal to HF ``generate``.

The steps cross every threshold of the code: prompts longer than a step's token budget (prefilled
over several steps), prompt chunks capped at ``prefill_chunk_size`` beside decodes (mixed steps),
dozens of KV pages per sequence, and MoE steps on both sides of ``DENSE_MAX_TOKENS`` (the op's dense
and grouped paths). Every rank runs the steps rank 0 schedules, so what rank 0's scheduler recorded
is what each rank ran; rank 0's logits are the all-reduce of every rank's part, so a rank that got
its experts wrong changes the tokens. Also at world_size 2: preemption under KV pressure and
``LLM.stream``.
"""

from __future__ import annotations

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.custom_ops.moe import DENSE_MAX_TOKENS

PAGE = 16
LONG = dict(device="cpu", dtype="float32", max_batch_size=4, max_seq_len=1040, attn_page_size=PAGE,
            max_num_tokens=256, compile_backend="torch-simple")
LENGTHS = [1000, 100, 300, 130]  # the first spans 63 pages and four steps of max_num_tokens
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def random_prompts(lengths, seed: int, vocab: int = 512) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_greedy():
    """HF transformers eager ``generate``, greedy, the reference (one model load per tiny model)."""
    from transformers import AutoModelForCausalLM

    from autodeploy.models.tiny import ensure_tiny_model

    models = {}

    def greedy(name: str, prompt: list[int], n: int) -> list[int]:
        if name not in models:
            models[name] = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(name), dtype=torch.float32).eval()
        ids = torch.tensor([prompt])
        out = models[name].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return greedy


def record_steps(llm: LLM, monkeypatch) -> list[list[int]]:
    """Each step's new tokens per sequence, as rank 0's scheduler hands them to every rank."""
    steps: list[list[int]] = []
    schedule = llm.engine.scheduler.schedule

    def recording():
        batch = schedule()
        if batch.num_new_tokens:
            steps.append(list(batch.num_new_tokens))
        return batch

    monkeypatch.setattr(llm.engine.scheduler, "schedule", recording)
    return steps


def is_mixed(step: list[int]) -> bool:
    return 1 in step and any(n > 1 for n in step)


@pytest.mark.parametrize("world,grid,chunk", [
    (2, None, 48),  # EP 2: mixed steps stay on the dense path (<= 48 prompt tokens + decodes)
    (4, {"ep": 2, "tp": 2}, 100),  # EP 2 x TP 2: mixed steps of ~100 tokens take the grouped path
], ids=["ep2", "ep2xtp2"])
def test_expert_parallel_long_prompts_equal_hf_generate(world, grid, chunk, hf_greedy, monkeypatch):
    detect = {"sharding_dims": ["tp", "ep"], **({"process_grid": grid} if grid else {})}
    prompts = random_prompts(LENGTHS, seed=world)
    with LLM("tiny_mixtral", world_size=world, prefill_chunk_size=chunk, **LONG,
             transforms={"detect_sharding": detect}) as llm:
        experts = [r for r in llm.sharding_plan.rows() if r.target.endswith("mlp.experts")]
        assert experts and {r.strategy for r in experts} == {"ep"}
        steps = record_steps(llm, monkeypatch)
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy("tiny_mixtral", p, GREEDY.max_tokens) for p in prompts]
    sizes = [sum(s) for s in steps]
    assert any(n > DENSE_MAX_TOKENS for n in sizes) and any(n <= DENSE_MAX_TOKENS for n in sizes)
    mixed = [s for s in steps if is_mixed(s)]
    assert mixed and max(sum(n for n in s if n > 1) for s in mixed) == chunk  # prompt chunks capped beside decodes
    if chunk > DENSE_MAX_TOKENS:
        assert any(sum(s) > DENSE_MAX_TOKENS for s in mixed)
    assert sizes.count(LONG["max_num_tokens"]) >= 3  # the 1000-token prompt: several full prefill steps


# ---- tensor parallel at world_size 2: one build for the long-context, preemption and stream tests ----


@pytest.fixture(scope="module")
def llama_ws2():
    """``tiny_llama`` on 2 CPU ranks, started as a user would (no OMP_NUM_THREADS: the ranks split the cores)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OMP_NUM_THREADS", raising=False)
        threads_before = torch.get_num_threads()
        llm = LLM("tiny_llama", world_size=2, prefill_chunk_size=64, **LONG)
    llm.threads_seen = {"before": threads_before, "rank 0": torch.get_num_threads()}
    yield llm
    llm.shutdown()
    llm.threads_seen["after"] = torch.get_num_threads()
    assert llm.threads_seen["after"] == threads_before  # the user's process gets its threads back


def test_spawned_cpu_ranks_share_the_cores(llama_ws2):
    from autodeploy.distributed.ranks import cpu_cores

    share = max(1, cpu_cores() // 2)
    assert llama_ws2.threads_seen["rank 0"] == share
    assert llama_ws2.ranks.worker_threads == {1: share}  # what rank 1's torch reported when it checked in


def test_tensor_parallel_long_prompts_equal_hf_generate(llama_ws2, hf_greedy, monkeypatch):
    prompts = random_prompts([1000, 700, 100, 260], seed=7)
    steps = record_steps(llama_ws2, monkeypatch)
    outs = llama_ws2.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy("tiny_llama", p, GREEDY.max_tokens) for p in prompts]
    assert any(is_mixed(s) for s in steps)


def test_stream_at_world_size_2(llama_ws2, hf_greedy):
    prompts = random_prompts([150, 20], seed=3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    seen: dict[int, list[list[int]]] = {}
    finished = {}
    for out in llama_ws2.stream(prompts, params):
        assert out.request_id not in finished  # nothing after a request's last snapshot
        seen.setdefault(out.request_id, []).append(list(out.token_ids))
        if out.finished:
            finished[out.request_id] = out
    assert len(finished) == 2
    for snapshots, final in zip(seen.values(), finished.values()):
        assert all(a == b[: len(a)] for a, b in zip(snapshots, snapshots[1:]))  # each extends the one before
        assert len({len(s) for s in snapshots}) > 1 and snapshots[-1] == final.token_ids
    by_prompt = sorted(finished.values(), key=lambda o: o.request_id)
    assert [o.token_ids for o in by_prompt] == [hf_greedy("tiny_llama", p, 6) for p in prompts]


def test_preemption_under_kv_pressure_at_world_size_2(llama_ws2, hf_greedy):
    """Rank 0's scheduler owns the pages: with its cache cut to one sequence's worth plus one page
    (the workers keep theirs, so every page id rank 0 hands out exists there too), four prompts that
    fill their last page exactly must preempt as they decode; recomputed requests give HF's tokens."""
    engine = llama_ws2.engine
    pages_before = engine.cache.num_pages
    engine.cache.resize(engine.cache.pages_per_seq + 1)  # 66 pages of 16 tokens
    try:
        prompts = random_prompts([16 * PAGE] * 4, seed=11)  # 16 pages each, 64 in all
        # enough tokens that all four run at once (each prefills in 4 chunks of 64 beside the decodes)
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        preemptions = engine.scheduler.num_preemptions
        outs = llama_ws2.generate(prompts, params, use_tqdm=False)
        assert engine.scheduler.num_preemptions > preemptions
        assert [o.token_ids for o in outs] == [hf_greedy("tiny_llama", p, 24) for p in prompts]
        assert engine.cache.num_used_pages == 0
    finally:
        engine.cache.resize(pages_before)
