"""Check and time the GPU attention backends on one GPU.

    PYTHONUNBUFFERED=1 python scripts/gpu_check.py [--out DIR] [--quick]

1. correctness: every test case of tests/gpu (prefill, chunked prefill, decode, mixed, windows,
   soft-cap, GQA, page boundaries) for triton, flashinfer (if installed) and torch, as the relative
   error ||out - ref|| / ||ref|| against a float64 reference, bf16 and fp16;
2. timings at Llama-8B attention shapes (32 q heads, 8 kv heads, head_dim 128, page 64, context
   1024, batch 1/8/32): decode (median of CUDA-graph replays over 8 layers' caches, so the caches
   are not served from L2, and eager launches) and prefill, against the torch backend and, for
   prefill, dense SDPA (flash attention, no paging) as a ceiling; the triton op's prefill
   (append + triton_prefill.varlen_attention) beside the old paged kernel; a decode split sweep
   and a few tile configs of both prefill kernels.
``--append`` / ``--mixed`` / ``--decode-merge``: one table only (prompt steps with the K/V append in the
kernel vs a launch of its own; the mixed step's decode rows; the decode split merge).
Prints a summary last and writes every number to DIR/gpu_check.json. Imports torch/triton only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "gpu")]
from attn_cases import SMALL_CASES, make_batch, reference, rel_err  # noqa: E402
from test_attention_backends import LARGE_CASES  # noqa: E402

from autodeploy.custom_ops.cached_attention import _load_builtin, get_backend  # noqa: E402
from autodeploy.custom_ops.cached_attention import triton_kernels as tk  # noqa: E402
from autodeploy.custom_ops.cached_attention import triton_prefill as tp  # noqa: E402

H, KV, D, PS, CTX, LAYERS = 32, 8, 128, 64, 1024, 8


def backends():
    _load_builtin()
    ops = {}
    for name in ("triton", "flashinfer", "torch"):
        try:
            ops[name] = get_backend(name).op()
        except RuntimeError as e:
            print(f"[skip] {name}: {e}")
    return ops


def check_correctness(ops, dtypes):
    rows = []
    for dtype in dtypes:
        for name, seqs, h, kv, d, ps, window, cap in SMALL_CASES + LARGE_CASES:
            batch = make_batch(seqs, h, kv, d, ps, dtype=dtype, device="cuda",
                               generator=torch.Generator().manual_seed(len(name)))
            ref, kc_ref, _ = reference(batch, d**-0.5, window, cap)
            row = {"case": name, "dtype": str(dtype).split(".")[-1]}
            for bname, op in ops.items():
                b = batch.clone()
                out = op(*b.args(), d**-0.5, window, cap)
                torch.cuda.synchronize()
                row[bname] = rel_err(out, ref)
                row[bname + "_cache_ok"] = bool(torch.equal(b.k_cache.double().cpu(), kc_ref))
            rows.append(row)
            print("  ", row)
    return rows


def bench_graph(fn, reps=50, calls=LAYERS):
    """Median ms of one call of fn, from CUDA-graph replays (fn runs ``calls`` calls)."""
    import triton

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=reps, return_mode="median") / calls


def bench_eager(fn, reps=50):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median") / LAYERS


def decode_setup(batch):
    b = make_batch([(CTX - 1, 1)] * batch, H, KV, D, PS, dtype=torch.bfloat16, device="cuda")
    caches = [(torch.randn_like(b.k_cache), torch.randn_like(b.v_cache)) for _ in range(LAYERS)]
    return b, caches


def time_decode(ops, batch, sweep):
    b, caches = decode_setup(batch)
    res = {}
    kv_bytes = batch * CTX * KV * D * 2 * 2  # K and V of every cached token, bf16

    def layers(call):
        def fn():
            for kc, vc in caches:
                call(kc, vc)
        return fn

    meta = (b.seq_len, b.input_pos, b.cu_seqlen, b.page_table)
    for name, op in ops.items():
        call = layers(lambda kc, vc, op=op: op(b.q, b.k, b.v, *meta, kc, vc, D**-0.5, None, None))
        res[name] = {"graph_ms": bench_graph(call), "eager_ms": bench_eager(call)}
    if "triton" in ops and sweep:
        for splits in (1, 2, 4, 8, 16, 32):
            call = layers(lambda kc, vc, s=splits: tk.decode_attention(
                b.q[0], b.k[0], b.v[0], kc, vc, b.input_pos, b.page_table, D**-0.5, 0, 0.0, num_splits=s))
            res[f"triton_splits{splits}"] = {"graph_ms": bench_graph(call)}
        res["heuristic_splits"] = tk.decode_num_splits(batch, KV, b.page_table.shape[1] * PS, b.q.device, 64)
        for bn, warps, stages in [(64, 4, 2), (128, 4, 2), (64, 8, 2), (128, 8, 2), (32, 4, 2), (64, 4, 3)]:
            call = layers(lambda kc, vc, bn=bn, w=warps, st=stages: tk.decode_attention(
                b.q[0], b.k[0], b.v[0], kc, vc, b.input_pos, b.page_table, D**-0.5, 0, 0.0,
                block_n=bn, num_warps=w, num_stages=st))
            res[f"triton_cfg_n{bn}_w{warps}_s{stages}"] = {"graph_ms": bench_graph(call)}
    for v in res.values():
        if isinstance(v, dict):
            v["TB_s"] = kv_bytes / (v["graph_ms"] * 1e-3) / 1e12
    return res


def time_decode_merge(batch):
    """The triton decode per layer (us) by split count and merge mode, as the engine runs it at
    isl 1024 (context ~1088 tokens of a 2048-token page table)."""
    b = make_batch([(CTX + 63, 1)] * batch, H, KV, D, PS, dtype=torch.bfloat16, device="cuda")
    caches = [(torch.randn_like(b.k_cache), torch.randn_like(b.v_cache)) for _ in range(LAYERS)]
    res = {"heuristic_splits": tk.decode_num_splits(batch, KV, 2048, b.q.device, 64)}
    for merge in ("last_split", "launch"):
        for splits in (1, 2, 4, 8, 16, 32):
            def fn(s=splits, m=merge):
                for kc, vc in caches:
                    tk.decode_attention(b.q[0], b.k[0], b.v[0], kc, vc, b.input_pos, b.page_table, D**-0.5, 0, 0.0,
                                        num_splits=s, merge=m)
            res[f"{merge}/{splits}"] = round(bench_graph(fn) * 1e3, 2)
    return res


def time_prefill(ops, batch, sweep):
    b = make_batch([(0, CTX)] * batch, H, KV, D, PS, dtype=torch.bfloat16, device="cuda")
    flops = 4 * batch * H * D * CTX * (CTX + 1) / 2  # causal QK^T and PV
    meta = (b.seq_len, b.input_pos, b.cu_seqlen, b.page_table)
    res = {}
    import triton

    def tflops(ms):
        return flops / (ms * 1e-3) / 1e12

    for name, op in ops.items():
        ms = triton.testing.do_bench(lambda op=op: op(b.q, b.k, b.v, *meta, b.k_cache, b.v_cache, D**-0.5, None, None),
                                     warmup=25, rep=100, return_mode="median")
        res[name] = {"ms": ms, "TFLOP_s": tflops(ms)}
    q = b.q[0].view(batch, CTX, H, D).transpose(1, 2).contiguous()
    k = b.k[0].view(batch, CTX, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1).contiguous()
    v = b.v[0].view(batch, CTX, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1).contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms = triton.testing.do_bench(lambda: sdpa(q, k, v, is_causal=True), warmup=25, rep=100, return_mode="median")
    res["sdpa_dense"] = {"ms": ms, "TFLOP_s": tflops(ms)}
    if "triton" in ops:  # the op runs append + triton_prefill.varlen_attention; the old paged kernel beside it
        def old_paged():
            tk.append_kv(b.k[0], b.v[0], b.k_cache, b.v_cache, b.input_pos, b.cu_seqlen, b.page_table)
            return tk.prefill_attention(b.q[0], b.k_cache, b.v_cache, b.input_pos, b.cu_seqlen, b.page_table,
                                        D**-0.5, 0, 0.0)
        ms = triton.testing.do_bench(old_paged, warmup=25, rep=100, return_mode="median")
        res["triton_old_paged"] = {"ms": ms, "TFLOP_s": tflops(ms)}
        ref = sdpa(q, k, v, is_causal=True).transpose(1, 2).reshape(batch * CTX, H, D)
        for bm, bn, warps, stages in ([(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2),
                                       (64, 64, 4, 3)] if sweep else [(128, 64, 8, 3), (128, 32, 8, 3)]):
            def fn(bm=bm, bn=bn, warps=warps, stages=stages):
                return tp.varlen_attention(b.q[0], b.k[0], b.v[0], b.k_cache, b.v_cache, b.input_pos, b.cu_seqlen,
                                           b.page_table, D**-0.5, 0, 0.0, block_m=bm, block_n=bn, num_warps=warps,
                                           num_stages=stages)
            key = f"triton_varlen_m{bm}_n{bn}_w{warps}_s{stages}"
            try:
                err = rel_err(fn(), ref)
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                res[key] = {"ms": ms, "TFLOP_s": tflops(ms), "rel_err_vs_sdpa": err}
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, go on
                res[key] = {"error": f"{type(e).__name__}: {e}"[:200]}
    if "triton" in ops and sweep:
        tk.append_kv(b.k[0], b.v[0], b.k_cache, b.v_cache, b.input_pos, b.cu_seqlen, b.page_table)
        ref = sdpa(q, k, v, is_causal=True).transpose(1, 2).reshape(batch * CTX, H, D)
        for bm, bn, warps, stages, rev in [(64, 64, 4, 2, True), (64, 64, 4, 2, False), (128, 64, 8, 2, True),
                                           (128, 64, 8, 2, False), (64, 64, 4, 3, True), (64, 128, 4, 2, True),
                                           (128, 128, 8, 2, True)]:
            def fn(bm=bm, bn=bn, warps=warps, stages=stages, rev=rev):
                return tk.prefill_attention(b.q[0], b.k_cache, b.v_cache, b.input_pos, b.cu_seqlen, b.page_table,
                                            D**-0.5, 0, 0.0, block_m=bm, block_n=bn, num_warps=warps,
                                            num_stages=stages, reverse=rev)
            key = f"triton_attn_only_m{bm}_n{bn}_w{warps}_s{stages}{'_rev' if rev else '_fwd'}"
            try:
                err = rel_err(fn(), ref)  # every config must compute the same thing
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                res[key] = {"ms": ms, "TFLOP_s": tflops(ms), "rel_err_vs_sdpa": err}
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, go on
                res[key] = {"error": f"{type(e).__name__}: {e}"[:200]}
    return res


def host_overhead(ops, calls=300):
    """Host time per call (us) of a tiny decode step (GPU work far below launch cost), by entry point:
    the registered op, a Library-defined op with the same body, the Python body, the bare kernels."""
    import time

    b = make_batch([(63, 1)], H, KV, D, PS, dtype=torch.bfloat16, device="cuda")

    @torch.library.custom_op("adbench::attn", mutates_args=("k_cache", "v_cache"))
    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: torch.Tensor, input_pos: torch.Tensor,
             cu_seqlen: torch.Tensor, page_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             scale: float, sliding_window: Optional[int] = None, logit_cap: Optional[float] = None) -> torch.Tensor:
        return tk.cached_attention(q, k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache, scale,
                                   sliding_window, logit_cap)

    paths = {
        "library_op (the backend's)": lambda: ops["triton"](*b.args(), 0.1, None, None),
        "custom_op (same body)": lambda: torch.ops.adbench.attn(*b.args(), 0.1, None, None),
        "python_body": lambda: tk.cached_attention(*b.args(), 0.1, None, None),
        "decode_kernels_only": lambda: tk.decode_attention(b.q[0], b.k[0], b.v[0], b.k_cache, b.v_cache,
                                                           b.input_pos, b.page_table, 0.1, 0, 0.0),
        "decode_1split": lambda: tk.decode_attention(b.q[0], b.k[0], b.v[0], b.k_cache, b.v_cache,
                                                     b.input_pos, b.page_table, 0.1, 0, 0.0, num_splits=1),
    }
    res = {}
    for order in (list(paths), list(reversed(paths))):  # two rounds, opposite orders; keep the best
        for name in order:
            fn = paths[name]
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            res[name] = min(res.get(name, float("inf")), (time.perf_counter() - t0) / calls * 1e6)
    return res


def time_mixed(prompts=2, decodes=30):
    """A mixed step of the batch-32 benchmark: ``prompts`` fresh 1024-token prompts, then
    ``decodes`` one-token sequences at context 1024, through ``varlen_attention`` with the decode
    rows' key block at 32/64/128; beside it the two parts alone (the prompts in varlen, the
    decodes in the decode kernel) as the cost of two launches. ms per layer, median."""
    import triton

    b = make_batch([(0, CTX)] * prompts + [(CTX, 1)] * decodes, H, KV, D, PS, dtype=torch.bfloat16, device="cuda")
    args = (b.q[0], b.k[0], b.v[0], b.k_cache, b.v_cache, b.input_pos, b.cu_seqlen, b.page_table, D**-0.5, 0, 0.0)
    res = {}
    ref = tp.varlen_attention(*args, block_n_one=32)
    for bn1 in (32, 64, 128):
        def fn(bn1=bn1):
            return tp.varlen_attention(*args, block_n_one=bn1)
        try:
            err = rel_err(fn(), ref)
            res[f"varlen_n_one{bn1}"] = {"ms": triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"),
                                         "rel_err_vs_n_one32": err}
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, go on
            res[f"varlen_n_one{bn1}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    p = make_batch([(0, CTX)] * prompts, H, KV, D, PS, dtype=torch.bfloat16, device="cuda")
    pargs = (p.q[0], p.k[0], p.v[0], p.k_cache, p.v_cache, p.input_pos, p.cu_seqlen, p.page_table, D**-0.5, 0, 0.0)
    res["prompts_only_varlen"] = {"ms": triton.testing.do_bench(lambda: tp.varlen_attention(*pargs), warmup=25,
                                                                rep=100, return_mode="median")}
    d = make_batch([(CTX, 1)] * decodes, H, KV, D, PS, dtype=torch.bfloat16, device="cuda")
    dargs = (d.q[0], d.k[0], d.v[0], d.k_cache, d.v_cache, d.input_pos, d.page_table, D**-0.5, 0, 0.0)
    res["decodes_only_decode_kernel"] = {"ms": triton.testing.do_bench(lambda: tk.decode_attention(*dargs), warmup=25,
                                                                       rep=100, return_mode="median")}
    return res


def time_append():
    """Steps with prompt tokens through the triton op (the varlen kernel appending the new K/V in
    the same launch) against ``append_kv`` then the kernel (the op before 2026-12-01): ``ms``
    (eager, median; small steps are bound by the host's launches), ``gpu_ms`` (one call replayed
    from a CUDA graph: the kernels alone), ``host_us`` (per call, launches queued back to back),
    and the error vs float64 (not for 32 prompts)."""
    import time

    import triton

    op = get_backend("triton").op()
    shapes = {"1x1024": [(0, CTX)], "2x1024": [(0, CTX)] * 2, "2x1024+30dec": [(0, CTX)] * 2 + [(CTX, 1)] * 30,
              "1x1024+chunk512+30dec": [(0, CTX), (CTX, 512)] + [(CTX, 1)] * 30, "32x1024": [(0, CTX)] * 32}
    res = {}
    for name, seqs in shapes.items():
        b = make_batch(seqs, H, KV, D, PS, dtype=torch.bfloat16, device="cuda")
        ref = reference(b.clone(), D**-0.5)[0] if name != "32x1024" else None

        def two_launches():
            tk.append_kv(b.k[0], b.v[0], b.k_cache, b.v_cache, b.input_pos, b.cu_seqlen, b.page_table)
            return tp.varlen_attention(b.q[0], b.k[0], b.v[0], b.k_cache, b.v_cache, b.input_pos, b.cu_seqlen,
                                       b.page_table, D**-0.5, 0, 0.0).unsqueeze(0)

        def the_op():
            return op(*b.args(), D**-0.5, None, None)

        row = {}
        for key, fn in (("two_launches", two_launches), ("op", the_op)):
            out = fn()
            row[f"{key}_ms"] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            row[f"{key}_host_us"] = (time.perf_counter() - t0) / 50 * 1e6
            torch.cuda.synchronize()
            row[f"{key}_gpu_ms"] = bench_graph(fn, reps=100, calls=1)
            row[f"{key}_err"] = rel_err(out, ref) if ref is not None else None
        res[name] = row
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="bf16 only, no sweeps")
    ap.add_argument("--decode-merge", action="store_true",
                    help="only the decode split x merge table (bs 1, 8, 32), then exit")
    ap.add_argument("--mixed", action="store_true",
                    help="only the mixed-step table (2 prompts + 30 decodes, decode-row key blocks), then exit")
    ap.add_argument("--append", action="store_true",
                    help="only the prompt-step table (append in the kernel vs append_kv then the kernel), then exit")
    args = ap.parse_args()
    import triton

    props = torch.cuda.get_device_properties(0)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
           "triton": triton.__version__, "commit": os.environ.get("GIT_COMMIT", "?")}
    print("env:", env)
    ops = backends()
    report = {"env": env, "correctness": [], "decode": {}, "prefill": {}, "errors": {}}
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16]

    def section(name, fn):  # a failing section is reported; the others still run
        print(f"== {name}")
        try:
            result = fn()
            print("  ", result if not isinstance(result, list) else f"{len(result)} rows")
            return result
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            report["errors"][name] = f"{type(e).__name__}: {e}"
            return None

    if args.append:
        print(f"RESULT append {section('prompt steps', time_append)}", flush=True)
        return
    if args.mixed:
        print(f"RESULT mixed {section('mixed step', time_mixed)}", flush=True)
        return
    if args.decode_merge:
        for batch in (1, 8, 32):
            r = section(f"decode merge batch {batch}", lambda: time_decode_merge(batch))
            print(f"RESULT decode_merge bs{batch} {r}", flush=True)
        return
    report["correctness"] = section("correctness (relative error vs float64)",
                                    lambda: check_correctness(ops, dtypes)) or []
    for batch in (1, 8, 32):
        r = section(f"decode batch {batch}", lambda: time_decode(ops, batch, sweep=not args.quick))
        if r:
            report["decode"][batch] = r
    if "triton" in ops:
        r = section("host time per call (us)", lambda: host_overhead(ops))
        if r:
            report["host_us"] = r
    for batch in (1, 8, 32):
        sweep = not args.quick and batch in (1, 8)
        r = section(f"prefill batch {batch}", lambda: time_prefill(ops, batch, sweep=sweep))
        if r:
            report["prefill"][batch] = r
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))

    print("\n==== summary", env["device"], env["date"])
    worst = {}
    for row in report["correctness"]:
        for k, v in row.items():
            if k not in ("case", "dtype") and not k.endswith("_cache_ok"):
                key = f"{k}/{row['dtype']}"
                worst[key] = max(worst.get(key, 0.0), v)
    bad_cache = [(r["case"], r["dtype"]) for r in report["correctness"]
                 for k, v in r.items() if k.endswith("_cache_ok") and not v]
    print("max rel err:", {k: f"{v:.2e}" for k, v in worst.items()}, "| cache mismatches:", bad_cache or "none")
    if report["errors"]:
        print("FAILED sections:", report["errors"])
    print(f"decode, ctx {CTX}, per layer (CUDA graph replay; eager in brackets):")
    for batch, r in report["decode"].items():
        line = "  ".join(f"{n} {r[n]['graph_ms'] * 1e3:.1f}us ({r[n]['eager_ms'] * 1e3:.0f}) {r[n]['TB_s']:.2f}TB/s"
                         for n in ops if n in r)
        sweep = " ".join(f"s{k[13:]}={v['graph_ms'] * 1e3:.1f}" for k, v in r.items() if k.startswith("triton_splits"))
        cfgs = " ".join(f"{k[11:]}={v['graph_ms'] * 1e3:.1f}" for k, v in r.items() if k.startswith("triton_cfg"))
        print(f"  bs{batch}: {line}  | splits(heur {r.get('heuristic_splits')}): {sweep} | {cfgs}")
    if "host_us" in report:
        print("host us/call:", {k: round(v, 1) for k, v in report["host_us"].items()})
    print(f"prefill {CTX} tokens/seq, per layer:")
    for batch, r in report["prefill"].items():
        print(f"  bs{batch}: " + "  ".join(f"{n} {v['ms']:.3f}ms {v['TFLOP_s']:.0f}TF/s" for n, v in r.items()
                                          if "ms" in v and not n.startswith(("triton_attn", "triton_varlen"))))
        for n, v in r.items():
            if n.startswith(("triton_attn", "triton_varlen")):
                print(f"     {n}: " + (f"{v['ms']:.3f}ms {v['TFLOP_s']:.0f}TF/s err {v['rel_err_vs_sdpa']:.1e}"
                                          if "ms" in v else v["error"]))


if __name__ == "__main__":
    main()
