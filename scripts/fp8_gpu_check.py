"""Issue 26 on one GPU: FP8 (on the fly and from a checkpoint) beside bf16, cold and warm builds.

    PYTHONUNBUFFERED=1 python3 scripts/fp8_gpu_check.py --out DIR [--budget 520] [--ckpt-block] [--only STEPS]

Every step runs in a fresh process (a timeout each; the script skips what its budget cannot fit)
and writes ``DIR/<step>.json``; the end prints one table and writes ``DIR/fp8_gpu_check.json``.
The 8B steps build ``model=llama3_8b`` (random bf16 weights, the same ones in every step: the
loader draws them per name), triton attention, torch-opt, CUDA graphs for decode batches 1 and
32, and benchmark isl 1024 / osl 128 at batch 1 and 32 on one engine. Steps, in order:

1. ``kernels``: the FP8 GEMMs at the 8B shapes (M = 1, 32, 1024) against bf16 (weights rotated
   past L2), every Triton config at M = 1 and 32, and their error against the fp32 reference;
2. ``bf16_cold``: a build with an empty build cache (a fresh ``AUTODEPLOY_BUILD_CACHE``, inductor
   and Triton caches inside it), then the first request (1024 tokens, 1 new): the cold build;
3. ``bf16_warm``: the same build again in a new process (the caches filled): the warm build, then
   the bf16 benchmark (the baseline) and the last-token logits of 4 prompts (accuracy);
4. ``fp8_fly``: ``quantize_fp8.on_the_fly=true``: build, benchmark, logits;
5. ``write_ckpt``: the same random weights as an HF FP8 checkpoint (``quant_method: fp8``, per-tensor
   ``weight_scale_inv``; ``--ckpt-block``: 128x128 blocks) in ``DIR/ckpt`` (~8.5 GB; deleted at the end);
6. ``fp8_ckpt``: build from that checkpoint, benchmark, logits;
7. ``tiny``: tiny_llama on the GPU in bf16, on the fly and from a 32x32-block FP8 checkpoint, against
   HF with the dequantized weights (greedy tokens, prefill logits);
8. ``ppl``: with a SmolLM2 card (``--ppl-model``, default smollm2_135m): perplexity of
   tests/data/perplexity.txt, bf16 against HF bf16 (within 1 %) and FP8 on the fly against bf16
   (within 2 %), and FP8 with the down projections kept 16-bit; skipped without the model.
A step the budget cannot fit is reported as skipped: ``--only tiny,ppl`` runs it in another call
(``--only`` keeps the cache folder's contents only for steps after ``bf16_cold``: every run empties it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ["kernels", "bf16_cold", "bf16_warm", "fp8_fly", "write_ckpt", "fp8_ckpt", "tiny", "ppl"]
TIMEOUTS = {"kernels": 90, "bf16_cold": 150, "bf16_warm": 120, "fp8_fly": 150, "write_ckpt": 150, "fp8_ckpt": 150,
            "tiny": 120, "ppl": 120}
GPU_ARGS = dict(dtype="bfloat16", max_seq_len=2048, max_batch_size=32, attn_backend="triton", compile_backend="torch-opt", cuda_graph_batch_sizes=[1, 32],
                free_mem_ratio=0.3)
ISL, OSL = 1024, 128
DEVICE = "cuda"  # a CPU dry run of the steps' code sets "cpu" (and smaller GPU_ARGS)
FP8_ON_THE_FLY = {"quantize_fp8": {"stage": "weight_load", "on_the_fly": True}}


def log(msg: str) -> None:
    print(f"[fp8_gpu_check {time.perf_counter() - START:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------


def _bench(engine, bs: int) -> dict:
    from omegaconf import OmegaConf

    from autodeploy.bench.benchmark import run_batch_size

    cfg = OmegaConf.create({"enabled": True, "bs": bs, "batch_sizes": [], "isl": ISL, "osl": OSL, "num": 2,
                            "warmup": 1})
    r = run_batch_size(engine, cfg, bs)
    out = {k: (v.get("p50") if isinstance(v, dict) else v) for k, v in r.items() if k not in ("itl_trace", "roofline")}
    out["ttft_max_ms"] = r["ttft_ms"].get("max")
    log(f"bs={bs}: decode {out['decode_tok_s']:.1f} tok/s, ITL p50 {out['itl_ms']:.3f} ms, TTFT p50 {out['ttft_ms']:.2f} "
        f"ms (max {out['ttft_max_ms']:.1f}), output {out['output_tok_s']:.1f} tok/s")
    return out


def _last_logits(engine, prompts) -> "torch.Tensor":  # noqa: F821
    """Each prompt's last-token logits from one prefill step of the cached graph (float32, CPU)."""
    import torch

    cache = engine.cache
    pages = [cache.allocate_pages(cache.pages_needed(len(p))) for p in prompts]
    slots = [cache.allocate_slot() for _ in prompts]
    try:
        inputs = cache.info.build(prompts, [0] * len(prompts), pages, slots)
        with torch.inference_mode():
            out = engine.model(**inputs.named_args, **cache.tensors)
        out = out if isinstance(out, torch.Tensor) else out["logits"]
        if out.shape[1] != len(prompts):  # every token's logits: take each prompt's last
            ends = torch.tensor([sum(len(p) for p in prompts[: i + 1]) - 1 for i in range(len(prompts))])
            out = out[:, ends.to(out.device)]
        return out[0].float().cpu()
    finally:
        for p in pages:
            cache.free_pages(p)
        for s in slots:
            cache.free_slot(s)


def _build_8b(model: str = "llama3_8b", **extra) -> tuple:
    from autodeploy import LLM
    from autodeploy.bench.report import build_stage_times

    t0 = time.perf_counter()
    llm = LLM(model, **GPU_ARGS, **extra)
    build_s = time.perf_counter() - t0
    stages = build_stage_times(llm.build_report)
    notes = {r["name"]: r["note"] for r in llm.build_report if r["name"] in ("quantize_fp8", "build_cache",
                                                                             "compile_model")}
    log(f"built in {build_s:.1f}s: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    for k, v in notes.items():
        log(f"  {k}: {v}")
    return llm, {"build_s": build_s, "phases_s": llm.build_phases, "stage_s": stages, "notes": notes}


def _first_token(llm) -> float:
    from autodeploy import SamplingParams
    from autodeploy.bench.benchmark import random_prompts

    import torch

    prompt = random_prompts(1, ISL, llm.engine.vocab_size, seed=7)
    t0 = time.perf_counter()
    llm.engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def child_build(step: str, out: Path, extra: dict, bench: bool) -> dict:
    import torch

    from autodeploy.bench.benchmark import random_prompts

    imported = time.perf_counter() - START
    llm, record = _build_8b(**extra)
    record["import_s"] = imported
    record["first_token_s"] = _first_token(llm)
    record["process_to_first_token_s"] = time.perf_counter() - START
    log(f"first token {record['first_token_s']:.2f}s after the build; {record['process_to_first_token_s']:.1f}s "
        f"after the process started (imports {imported:.1f}s)")
    if bench:
        record["bench"] = {bs: _bench(llm.engine, bs) for bs in (1, 32)}
        prompts = random_prompts(4, min(512, GPU_ARGS["max_seq_len"] // 2), llm.engine.vocab_size, seed=11)
        torch.save(_last_logits(llm.engine, prompts), out / f"{step}_logits.pt")
        weights = [p for n, p in llm.engine.model.named_parameters()]
        record["weight_gb"] = sum(p.numel() * p.element_size() for p in weights) / 1e9
    record["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
    llm.shutdown()
    return record


def child_kernels(out: Path) -> dict:
    import torch
    import torch.nn.functional as F

    import autodeploy.custom_ops.linear  # noqa: F401  registers torch.ops.autodeploy.linear
    from autodeploy.custom_ops import fp8_linear as fl
    from autodeploy.custom_ops.fp8_kernels import DOT_CONFIGS, GEMV_CONFIGS, fp8_mm

    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    rows = {}

    def timed(fn, reps=30) -> float:
        fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1e3 / reps  # us

    for name, (n, k) in shapes.items():
        copies = max(1, int(512e6 // (n * k * 2)))  # rotate past the L2 cache
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        qs = [fl.quantize_per_channel(w) for w in ws]
        for m in (1, 32, 1024):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            it = {"i": 0}

            def nxt():
                it["i"] = (it["i"] + 1) % copies
                return it["i"]

            # bf16 as the engine runs it: the Triton GEMV for one row (one_token_gemv), cuBLAS otherwise
            t_bf16 = timed(lambda: torch.ops.autodeploy.linear(x, ws[nxt()], None))
            t_fp8 = timed(lambda: fl.fp8_matmul(x, *qs[nxt()]))
            ref = F.linear(x.float(), fl.dequantize(*qs[0]))
            err = ((fl.fp8_matmul(x, *qs[0]).float() - ref).norm() / ref.norm()).item()
            row = {"bf16_us": t_bf16, "fp8_us": t_fp8, "speedup": t_bf16 / t_fp8, "fp8_rel_err": err,
                   "fp8_tb_s": n * k / t_fp8 / 1e6, "bf16_tb_s": 2 * n * k / t_bf16 / 1e6}
            if m in (1, 32):
                sweep = {}
                for cfg in GEMV_CONFIGS if m == 1 else DOT_CONFIGS:
                    sweep[str(cfg)] = timed(lambda: fp8_mm(x, *qs[nxt()], config=cfg))
                row["configs_us"] = sweep
            rows[f"{name} M={m}"] = row
            log(f"{name:8s} M={m:5d}: bf16 {t_bf16:8.1f} us ({row['bf16_tb_s']:.2f} TB/s), fp8 {t_fp8:8.1f} us "
                f"({row['fp8_tb_s']:.2f} TB/s) {row['speedup']:.2f}x, rel err {err:.1e}"
                + (f"; configs {', '.join(f'{c}: {t:.1f}' for c, t in row['configs_us'].items())}"
                   if "configs_us" in row else ""))
        ws = qs = None  # free before the next shape
        torch.cuda.empty_cache()
    return {"gemms": rows}


def child_write_ckpt(out: Path, block: bool, model_name: str = "llama3_8b") -> dict:
    """The random weights the loader draws for llama3_8b (per name, on the GPU), as an HF FP8
    checkpoint: every linear but lm_head in e4m3 with ``weight_scale_inv``."""
    import torch
    from safetensors.torch import save_file
    from autodeploy.custom_ops import fp8_linear as fl
    from autodeploy.models.factory import ModelFactory
    from autodeploy.models.materialize import random_tensor

    directory = out / "ckpt"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    factory = ModelFactory(model_name, skip_loading_weights=True, dtype="bfloat16")
    model = factory.build_model("meta")
    record = factory._record()
    shards: dict[str, dict] = {}
    t0 = time.perf_counter()
    for name, p in model.named_parameters():
        w = random_tensor(name, list(p.shape), torch.bfloat16, torch.device(DEVICE), record.init_std)
        parts = name.split(".")
        shard = f"layer{int(parts[2]):02d}" if parts[1:2] == ["layers"] else "rest"
        tensors = shards.setdefault(shard, {})
        if name.endswith(".weight") and w.dim() == 2 and "embed_tokens" not in name and not name.startswith("lm_head"):
            q, s = fl.quantize_blocks(w, (128, 128)) if block else fl.quantize_per_tensor(w)
            tensors[name], tensors[name[: -len("weight")] + "weight_scale_inv"] = q.cpu(), s.cpu()
        else:
            tensors[name] = w.cpu()
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(directory / f"model-{shard}.safetensors"))
        weight_map.update({k: f"model-{shard}.safetensors" for k in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    factory.config.save_pretrained(str(directory))
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128] if block else None,
                                  "modules_to_not_convert": ["lm_head"]}
    cfg["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    size = sum(f.stat().st_size for f in directory.iterdir()) / 1e9
    log(f"wrote {directory} ({size:.1f} GB, {'128x128 blocks' if block else 'per-tensor'}) in {time.perf_counter() - t0:.1f}s")
    return {"dir": str(directory), "gb": size, "block": block}


def _tiny_fp8_checkpoint(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from autodeploy.custom_ops import fp8_linear as fl

    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for k, t in tensors.items():
        if k.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in k and not k.startswith("lm_head"):
            out[k], out[k[: -len("weight")] + "weight_scale_inv"] = fl.quantize_blocks(t, (32, 32))
        else:
            out[k] = t
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32],
                                  "modules_to_not_convert": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    del torch


def _dequantized_hf(src: Path, block):
    """HF on the GPU in bf16 with the weights our build holds: the checkpoint's blocks (quantized
    from the fp32 weights), or on the fly per channel from the bf16 weights the loader reads."""
    import torch
    from transformers import AutoModelForCausalLM

    from autodeploy.custom_ops import fp8_linear as fl

    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".weight") and p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                q, s = fl.quantize_blocks(p, block) if block else fl.quantize_per_channel(p.bfloat16())
                p.copy_(fl.dequantize(q, s, block))
    return hf.to(device=DEVICE, dtype=torch.bfloat16).eval()


def child_tiny(out: Path) -> dict:
    import torch

    from autodeploy import LLM, SamplingParams
    from autodeploy.models.tiny import ensure_tiny_model

    src = ensure_tiny_model("tiny_llama")
    ckpt = out / "tiny_fp8_blocks"
    _tiny_fp8_checkpoint(src, ckpt)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (100, 70, 33, 20, 9, 3, 130, 64)]
    kw = dict(dtype="bfloat16", max_batch_size=8, max_seq_len=256, skip_tokenizer_init=True,
              **{k: GPU_ARGS[k] for k in ("attn_backend", "compile_backend")})
    result = {}
    for name, model, extra, block in (("on_the_fly", "tiny_llama", {"transforms": FP8_ON_THE_FLY}, None),
                                      ("checkpoint_32x32_blocks", str(ckpt), {}, (32, 32))):
        llm = LLM(model, **kw, **extra)
        hf = _dequantized_hf(src, block)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        equal_seqs, first_tokens = 0, 0
        for p, o in zip(prompts, outs):
            ids = torch.tensor([p], device=DEVICE)
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            equal_seqs += o.token_ids == ref
            first_tokens += o.token_ids[:1] == ref[:1]
        logits = _last_logits(llm.engine, prompts[:4])
        with torch.no_grad():
            ref_logits = torch.stack([hf(input_ids=torch.tensor([p], device=DEVICE)).logits[0, -1].float().cpu()
                                      for p in prompts[:4]])
        rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
        result[name] = {"greedy_sequences_equal": f"{equal_seqs}/{len(prompts)}",
                        "first_tokens_equal": f"{first_tokens}/{len(prompts)}", "last_logits_rel_err": rel,
                        "quantize_fp8": next(r["note"] for r in llm.build_report if r["name"] == "quantize_fp8")}
        log(f"tiny {name}: {result[name]}")
        llm.shutdown()
    return result


def child_ppl(out: Path, model: str) -> dict:
    """Perplexity of tests/data/perplexity.txt (windows of 256, stride 128, through prompt_logprobs):
    bf16 and FP8 on the fly, each beside HF bf16 on the same (unquantized) weights."""
    from autodeploy import LLM
    from autodeploy.eval.perplexity import hf_perplexity, perplexity
    from autodeploy.eval.reference import hf_model
    from autodeploy.models.factory import ModelResolutionError

    text = (Path(__file__).resolve().parents[1] / "tests" / "data" / "perplexity.txt").read_text()
    result = {}
    keep_down = {"quantize_fp8": {**FP8_ON_THE_FLY["quantize_fp8"],
                                  "exclude": ["lm_head", "*.gate", "*.router", "*.down_proj"]}}
    for name, transforms in (("bf16", {}), ("fp8_on_the_fly", FP8_ON_THE_FLY), ("fp8_keep_down_proj", keep_down)):
        try:
            llm = LLM(model, dtype="bfloat16", max_batch_size=8, max_seq_len=1024,
                      **({"transforms": transforms} if transforms else {}),
                      **{k: GPU_ARGS[k] for k in ("attn_backend", "compile_backend")})
        except ModelResolutionError as e:
            return {"skipped": f"no model {model!r}: {e}"}
        ids = list(llm.tokenizer.encode(text))
        ours = perplexity(llm, ids, 256, 128)
        result[name] = {"tokens": len(ids), "ppl": ours.perplexity}
        if name == "bf16":  # HF on the bf16 weights (the FP8 run quantizes the same ones)
            result["hf_bf16"] = {"tokens": len(ids), "ppl": hf_perplexity(hf_model(llm), ids, 256, 128).perplexity}
        log(f"ppl {model} {name}: {result[name]}")
        llm.shutdown()
    result["bf16_vs_hf_bf16"] = result["bf16"]["ppl"] / result["hf_bf16"]["ppl"] - 1
    result["fp8_vs_bf16"] = result["fp8_on_the_fly"]["ppl"] / result["bf16"]["ppl"] - 1
    result["fp8_keep_down_proj_vs_bf16"] = result["fp8_keep_down_proj"]["ppl"] / result["bf16"]["ppl"] - 1
    log(f"ppl {model}: bf16 vs HF bf16 {result['bf16_vs_hf_bf16']:+.3%}, FP8 on the fly vs bf16 "
        f"{result['fp8_vs_bf16']:+.3%} (targets: 1 %, 2 %); down_proj kept 16-bit: "
        f"{result['fp8_keep_down_proj_vs_bf16']:+.3%}")
    return result


def run_child(args) -> None:
    out = Path(args.out)
    step = args.child
    try:
        if step == "kernels":
            record = child_kernels(out)
        elif step in ("bf16_cold", "bf16_warm"):
            record = child_build(step, out, {}, bench=step == "bf16_warm")
        elif step == "fp8_fly":
            record = child_build(step, out, {"transforms": FP8_ON_THE_FLY}, bench=True)
        elif step == "write_ckpt":
            record = child_write_ckpt(out, args.ckpt_block)
        elif step == "fp8_ckpt":
            record = child_build(step, out, {"model": str(out / "ckpt"), "skip_loading_weights": False,
                                             "skip_tokenizer_init": True}, bench=True)
        elif step == "tiny":
            record = child_tiny(out)
        elif step == "ppl":
            record = child_ppl(out, args.ppl_model)
        else:
            raise ValueError(f"unknown step {step}")
        record["ok"] = True
    except Exception as e:  # noqa: BLE001 - the driver reports it and goes on
        import traceback

        traceback.print_exc()
        record = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    (out / f"{step}.json").write_text(json.dumps(record, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def _env(out: Path, step: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    caches = out / "cache"  # one empty cache for the first build, shared by every later step
    env["AUTODEPLOY_BUILD_CACHE"] = str(caches / "build")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(caches / "inductor")
    env["TRITON_CACHE_DIR"] = str(caches / "triton")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(out: Path, results: dict) -> None:
    print("\n==== issue 26: FP8 and rebuilds (one GPU) ====", flush=True)
    base = results.get("bf16_warm", {}).get("bench") or {}
    print(f"{'what':24s} {'bs':>3s} {'decode tok/s':>12s} {'vs bf16':>8s} {'ITL p50 ms':>10s} {'TTFT p50 ms':>11s} "
          f"{'vs bf16':>8s} {'out tok/s':>9s} {'weights GB':>10s} {'build s':>8s}")
    for step, label in (("bf16_warm", "bf16"), ("fp8_fly", "fp8 on the fly"),
                        ("fp8_ckpt", "fp8 checkpoint" + (" (blocks)" if results.get("write_ckpt", {}).get("block")
                                                          else ""))):
        r = results.get(step, {})
        if not r.get("ok"):
            print(f"{label:24s} {r.get('error', 'not run')}")
            continue
        for bs, b in sorted(r["bench"].items(), key=lambda kv: int(kv[0])):
            ref = base.get(bs) or base.get(str(bs)) or {}
            vs_dec = b["decode_tok_s"] / ref["decode_tok_s"] if ref.get("decode_tok_s") else None
            vs_ttft = b["ttft_ms"] / ref["ttft_ms"] if ref.get("ttft_ms") else None
            print(f"{label:24s} {bs:>3} {_fmt(b['decode_tok_s']):>12s} {_fmt(vs_dec, 2):>7s}x "
                  f"{_fmt(b['itl_ms'], 3):>10s} {_fmt(b['ttft_ms'], 2):>11s} {_fmt(vs_ttft, 2):>7s}x "
                  f"{_fmt(b['output_tok_s']):>9s} {_fmt(r.get('weight_gb'), 2):>10s} {_fmt(r['build_s']):>8s}")
    print("\nbuilds (s): total, to first token, then per stage")
    for step in ("bf16_cold", "bf16_warm", "fp8_fly", "fp8_ckpt"):
        r = results.get(step, {})
        if not r.get("ok"):
            continue
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_s"].items())
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items())
        print(f"  {step:10s} build {r['build_s']:.1f}, +first token {r['first_token_s']:.2f} "
              f"(process start to first token {r['process_to_first_token_s']:.1f}, imports {r['import_s']:.1f})\n"
              f"             stages: {stages}\n             phases: {phases}\n"
              f"             cache: {r['notes'].get('build_cache', '-')}")
    import torch

    logits = {s: out / f"{s}_logits.pt" for s in ("bf16_warm", "fp8_fly", "fp8_ckpt")}
    if logits["bf16_warm"].exists():
        ref = torch.load(logits["bf16_warm"])
        for step in ("fp8_fly", "fp8_ckpt"):
            if logits[step].exists():
                got = torch.load(logits[step])
                rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
                top1 = (got.argmax(-1) == ref.argmax(-1)).sum().item()
                print(f"accuracy 8B random weights, {step} vs bf16: last-token logits rel err "
                      f"{', '.join(f'{x:.3f}' for x in rel)}; same top-1 {top1}/{len(rel)}")
    for step in ("kernels", "tiny", "ppl"):
        r = results.get(step)
        if r is None:
            continue
        if not r.get("ok"):
            print(f"{step}: {r.get('error', 'not run')}")
        elif step == "kernels":
            print("FP8 GEMMs at the 8B shapes (us; fp8 speedup over bf16):")
            for k, v in r["gemms"].items():
                print(f"  {k:16s} bf16 {v['bf16_us']:8.1f} fp8 {v['fp8_us']:8.1f} {v['speedup']:.2f}x "
                      f"({v['fp8_tb_s']:.2f} TB/s) rel err {v['fp8_rel_err']:.1e}")
        else:
            print(f"{step}: {json.dumps({k: v for k, v in r.items() if k != 'ok'})}")
    (out / "fp8_gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n(all figures: {out}/fp8_gpu_check.json)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/fp8_gpu_check")
    parser.add_argument("--budget", type=float, default=520.0, help="seconds for all steps; later ones are skipped")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {','.join(STEPS)}")
    parser.add_argument("--ckpt-block", action="store_true", help="the 8B checkpoint in 128x128 blocks (else per tensor)")
    parser.add_argument("--ppl-model", default="smollm2_135m")
    parser.add_argument("--keep-ckpt", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.child:
        return run_child(args)
    import torch

    if not torch.cuda.is_available():
        sys.exit("fp8_gpu_check: needs a CUDA GPU")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "cache", ignore_errors=True)  # the cold build starts empty
    for stale in out.glob("*_logits.pt"):  # an earlier run's, which a failed step would leave behind
        stale.unlink()
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; results in {out}")
    steps = [s for s in STEPS if s in args.only.split(",")]
    results: dict = {}
    for step in steps:
        left = args.budget - (time.perf_counter() - START)
        if step == "fp8_ckpt" and not results.get("write_ckpt", {}).get("ok"):
            results[step] = {"ok": False, "error": "no checkpoint (write_ckpt did not run or failed)"}
            continue
        if left < 30:
            log(f"skip {step}: {left:.0f}s of the budget left")
            results[step] = {"ok": False, "error": "skipped (budget)"}
            continue
        timeout = min(TIMEOUTS[step], left)
        log(f"=== {step} (timeout {timeout:.0f}s)")
        cmd = [sys.executable, __file__, "--child", step, "--out", str(out), "--ppl-model", args.ppl_model]
        if args.ckpt_block:
            cmd.append("--ckpt-block")
        (out / f"{step}.json").unlink(missing_ok=True)
        try:
            subprocess.run(cmd, env=_env(out, step), timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            log(f"{step}: timed out after {timeout:.0f}s")
        path = out / f"{step}.json"
        results[step] = json.loads(path.read_text()) if path.exists() else {"ok": False, "error": "no result (timeout or crash)"}
        log(f"{step}: {'ok' if results[step].get('ok') else results[step].get('error')}")
    if not args.keep_ckpt:
        shutil.rmtree(out / "ckpt", ignore_errors=True)
    report(out, results)


if __name__ == "__main__":
    main()
