"""Multi-rank runs as a user starts them (CPU, gloo): ``LLM(world_size=N)``, ``launch.py``, torchrun,
and faults (a worker killed mid-generation, a worker that raises) that end the run cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from autodeploy import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 5, 9, 22, 41, 7], [1] + [100] * 12, [1, 3, 4]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
CPU = dict(device="cpu", dtype="float32", max_batch_size=4, max_seq_len=64, attn_page_size=16,
           compile_backend="torch-simple")


def _hf_greedy(name: str, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    from autodeploy.eval.reference import hf_greedy
    from autodeploy.models.tiny import ensure_tiny_model

    hf = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(name), dtype=torch.float32).eval()
    return hf_greedy(hf, prompt, n)


@pytest.mark.parametrize("name,world,extra", [
    ("tiny_llama", 2, {}),
    ("tiny_llama", 2, {"overlap_scheduler": True}),  # rank 0 feeds in-flight tokens into what it broadcasts
    ("tiny_hybrid", 2, {"transforms": {"detect_sharding": {"sharding_dims": ["tp", "ep", "bmm", "ssm"]}}}),
    # expert parallel (EP 2, EP 2 x TP 2): test_multirank_long_contexts.py, with prompts of 100 to 1000 tokens
])
def test_llm_api_greedy_equals_hf_generate(name, world, extra):
    with LLM(name, world_size=world, **CPU, **extra) as llm:
        procs = list(llm.ranks.procs)
        assert len(procs) == world - 1 and all(p.is_alive() for p in procs)
        assert llm.engine.overlap == bool(extra.get("overlap_scheduler"))  # off on the CPU unless asked for
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert any(r.strategy != "replicate" for r in llm.sharding_plan.rows())
    assert [o.token_ids for o in outs] == [_hf_greedy(name, p, 6) for p in PROMPTS]
    assert not any(p.is_alive() for p in procs)  # the context manager ended the workers


def test_logprobs_at_world_size_2_equal_hf():
    """Rank 0 samples and computes the logprobs from the gathered (vocab-sharded) logits; the
    workers run each step's forward on what rank 0 broadcasts, the rows to gather included: a
    prompt longer than the step's token budget, every row of its chunks, beside a request that
    asks for nothing."""
    from transformers import AutoModelForCausalLM

    from autodeploy.models.tiny import ensure_tiny_model

    long_prompt = [1] + [(7 * i) % 500 + 3 for i in range(44)]  # 45 tokens: chunks of 16
    asks = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    with LLM("tiny_llama", world_size=2, **{**CPU, "max_num_tokens": 16}) as llm:
        assert any(r.strategy != "replicate" for r in llm.sharding_plan.rows())
        out, plain = llm.generate([long_prompt, PROMPTS[0]], [asks, GREEDY], use_tqdm=False)
    assert out.token_ids == _hf_greedy("tiny_llama", long_prompt, 6)
    assert plain.token_ids == _hf_greedy("tiny_llama", PROMPTS[0], 6) and plain.logprobs is None
    hf = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny_llama"), dtype=torch.float32).eval()
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    entries = out.prompt_logprobs[1:] + out.logprobs
    assert out.prompt_logprobs[0] is None and len(entries) == len(ids) - 1
    for i, (entry, token) in enumerate(zip(entries, ids[1:])):
        assert token in entry and len(entry) in (3, 4)
        assert max(abs(lp.logprob - ref[i, t].item()) for t, lp in entry.items()) < 1e-4
        top = ref[i].topk(3).indices.tolist()
        assert [t for t in entry if entry[t].rank <= 3 and t != token] == [t for t in top if t != token]


def _launch(args: list[str], env_extra: dict | None = None, timeout: float = 300, module: list[str] | None = None):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, *(module or []), "launch.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


COMMON = ["model=tiny_llama", "args.device=cpu", "transforms/compile=torch-simple", "prompt=greedy",
          "prompt.sp_kwargs.max_tokens=8", "prompt.batch_size=2"]


@pytest.fixture(scope="module")
def single_rank_tokens(tmp_path_factory):
    out = tmp_path_factory.mktemp("ws1")
    proc = _launch([*COMMON, f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [g["token_ids"] for g in json.loads((out / "results.json").read_text())["generations"]]


def test_launch_spawns_its_ranks(tmp_path, single_rank_tokens):
    # the seed's flag style: --args.world-size=2
    proc = _launch([*COMMON, "--args.world-size=2", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [g["token_ids"] for g in results["generations"]] == single_rank_tokens
    assert results["sharding_summary"]["world_size"] == 2
    assert {r["strategy"] for r in results["sharding_plan"]} == {"colwise", "rowwise", "gather"}
    assert "sharding plan for world_size 2" in proc.stderr + proc.stdout


def test_torchrun_ranks_are_joined_not_spawned(tmp_path, single_rank_tokens):
    proc = _launch([*COMMON, "args.world_size=2", f"hydra.run.dir={tmp_path}"],
                   module=["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [g["token_ids"] for g in results["generations"]] == single_rank_tokens
    assert "2 ranks (torchrun)" in proc.stderr + proc.stdout
    # rank 1 went straight to work (no Hydra): rank 0 alone writes the run folder
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["autodeploy.log", "results.json"]


def _alive_with_marker(marker: str) -> list[int]:
    pids = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in env_file.read_bytes():
                pids.append(int(env_file.parent.name))
        except OSError:
            continue
    return pids


def _worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children if b"autodeploy.distributed.worker" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_a_killed_worker_ends_the_run(tmp_path):
    marker = f"AUTODEPLOY_TEST_MARK={uuid.uuid4()}"
    key, value = marker.split("=")
    args = ["model=tiny_llama", "args.device=cpu", "transforms/compile=torch-simple", "args.world_size=2",
            "prompt.batch_size=4", "prompt.sp_kwargs.max_tokens=400", "prompt.sp_kwargs.ignore_eos=true",
            "args.max_seq_len=512", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "launch.py", *args], cwd=ROOT, env={**os.environ, key: value},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # wait until the ranks are generating
            lines.append(line)
            if "built in" in line:
                break
        time.sleep(2.0)
        workers = _worker_pids(proc.pid)
        assert len(workers) == 1, "".join(lines)
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        rest, _ = proc.communicate(timeout=90)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode not in (0, None)
    assert elapsed < 60
    assert "rank 1 died (killed by SIGKILL)" in output
    assert not (tmp_path / "results.json").exists()
    time.sleep(1.0)
    assert _alive_with_marker(marker) == []


def test_a_worker_that_raises_ends_the_run_with_its_error(tmp_path):
    marker = f"AUTODEPLOY_TEST_MARK={uuid.uuid4()}"
    key, value = marker.split("=")
    t0 = time.monotonic()
    proc = _launch([*COMMON, "args.world_size=2", f"hydra.run.dir={tmp_path}"],
                   env_extra={"AUTODEPLOY_TEST_RAISE_ON_RANK": "1", key: value}, timeout=120)
    assert proc.returncode not in (0, None)
    assert time.monotonic() - t0 < 120
    output = proc.stdout + proc.stderr
    assert "rank 1 failed: RuntimeError: injected failure on rank 1" in output
    time.sleep(1.0)
    assert _alive_with_marker(marker) == []


@pytest.mark.parametrize("fault,error", [
    ("1@start", "rank 1 failed: RuntimeError: injected failure on rank 1"),  # raises before the group exists (as
    # rank_device does for a rank without a GPU)
    ("1@exit", "rank 1 died (exit code 3)"),  # dies before it reaches the store
], ids=["raises", "dies"])
def test_a_worker_that_fails_before_the_group_exists_ends_the_run(tmp_path, fault, error):
    """Rank 0 watches the workers from their start: it used to wait in init_process_group (24 h)
    or in the store (10 min) for a worker that was already gone."""
    marker = f"AUTODEPLOY_TEST_MARK={uuid.uuid4()}"
    key, value = marker.split("=")
    t0 = time.monotonic()
    proc = _launch([*COMMON, "args.world_size=2", f"hydra.run.dir={tmp_path}"],
                   env_extra={"AUTODEPLOY_TEST_RAISE_ON_RANK": fault, key: value}, timeout=120)
    elapsed = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    assert proc.returncode not in (0, None), output[-2000:]
    assert error in output
    assert elapsed < 90
    assert not (tmp_path / "results.json").exists()
    time.sleep(1.0)
    assert _alive_with_marker(marker) == []


def test_readme_api_example_at_world_size_2_runs_as_a_plain_script(tmp_path):
    """The README's Python API example with ``world_size=2``, at module level of a script without an
    ``if __name__ == "__main__":`` guard: the workers never import the user's script (a spawned
    multiprocessing child did, and died; rank 0 then waited 10 minutes for it)."""
    readme = (ROOT / "README.md").read_text()
    example = readme.split("### Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "LLM(" in example and "__main__" not in example
    script = example.replace("LLM(", "LLM(world_size=2, device='cpu', ", 1)
    script += "print('ranks', llm.ranks.world_size, len(llm.ranks.procs))\n"
    (tmp_path / "example.py").write_text(script)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" -> ") == 2 and "ranks 2 1" in proc.stdout, proc.stdout


def test_preflight_refuses_more_spawned_ranks_than_gpus(monkeypatch):
    from autodeploy.config import ConfigError, compose_experiment, preflight
    from autodeploy.distributed.env import launcher_env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"^args.world_size=3 needs 3 GPUs \(one per rank\) but 2 are visible"):
        preflight(compose_experiment(["model=tiny_llama", "args.world_size=3"]), 3)
    preflight(compose_experiment(["model=tiny_llama", "args.world_size=2"]), 2)
    preflight(compose_experiment(["model=tiny_llama", "args.world_size=3", "args.device=cpu"]), 3)  # no GPU limit
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    launcher_env.cache_clear()  # a process reads its launcher's variables once; this test changes them
    preflight(compose_experiment(["model=tiny_llama", "args.world_size=3"]), 3)  # torchrun placed the ranks
    with pytest.raises(ConfigError, match=r"^args.world_size=2 but torchrun started 3 ranks: set args.world_size=3"):
        preflight(compose_experiment(["model=tiny_llama", "args.world_size=2"]), 2)
    preflight(compose_experiment(["model=tiny_llama"]), 1)  # a world of one runs in rank 0; the others idle
    launcher_env.cache_clear()


def test_tiny_moe_ep_experiment_runs_expert_parallel(tmp_path):
    proc = _launch(["experiment=tiny_moe_ep", "prompt.sp_kwargs.max_tokens=4", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    experts = [r for r in results["sharding_plan"] if r["target"].endswith("mlp.experts")]
    assert len(experts) == 2 and {(r["strategy"], r["dim"]) for r in experts} == {("ep", "ep")}
    assert all(g["finish_reason"] in ("length", "stop") for g in results["generations"])


def test_joined_ranks_leave_their_group_before_rank_0(monkeypatch):
    """Ranks rank 0 did not spawn (torchrun, SLURM) cannot be joined: at shutdown rank 0 waits on
    the store until each worker has destroyed its process group, then destroys its own."""
    import datetime

    import torch.distributed as dist

    from autodeploy.distributed import ranks as ranks_mod
    from autodeploy.distributed.env import RankEnv

    events = []

    class Store:
        def wait(self, keys, timeout):
            events.append(("wait", keys, timeout))

    monkeypatch.setattr(ranks_mod.StepChannel, "send_stop", lambda self: events.append(("stop",)))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: events.append(("destroy",)))
    r = ranks_mod.Ranks(RankEnv(0, 3, 0, "127.0.0.1", 1, "torchrun"), Store(), [])
    r.channel = ranks_mod.StepChannel(torch.device("cpu"), 16)  # as connect() leaves it
    r.shutdown()
    assert events == [("stop",), ("wait", ["done/1", "done/2"], datetime.timedelta(seconds=30)), ("destroy",)]
