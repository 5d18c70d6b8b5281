"""The decode and prefill GEMMs of Llama-3.1-8B (fused q/k/v and gate/up), timed per BLAS library.

    python3 scripts/gemm_check.py [--m 1,32,1024] [--out DIR]

For each weight shape [N, K] and token count M: ``x[M, K] @ w.T`` as the compiled graph calls it
(an ``mm`` on the transposed weight), replayed in a CUDA graph over enough copies of the weight
that none stays in L2 (each layer reads its own weights), with cuBLAS and with cuBLASLt
(``torch.backends.cuda.preferred_blas_library``). Prints µs per GEMM and the bandwidth (decode)
or TFLOP/s (prefill); writes DIR/gemm_check.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def weights(n: int, k: int) -> list[torch.Tensor]:
    copies = max(2, -(-2 * 1024**3 // (n * k * 2)))  # >= 2 GiB of weights: nothing stays in L2
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(min(copies, 64))]


def time_gemm(n: int, k: int, m: int, reps: int = 20, gemv_config=None, ws=None) -> float:
    """µs per ``x @ w.T`` with the current BLAS library (or the Triton GEMV with ``gemv_config``),
    each replay on a different weight copy."""
    from autodeploy.custom_ops.gemv import gemv

    ws = ws or weights(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

    def call(w):
        if gemv_config is None:
            torch.mm(x, w.t(), out=out)
        else:
            gemv(x, w, None, gemv_config)  # its output stays in the graph pool

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm-up (cuBLAS picks and loads its kernels, Triton compiles)
        for w in ws[:3]:
            call(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(reps):
            call(ws[i % len(ws)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", default="1,32,1024")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sustained", type=float, default=0.0,
                        help="seconds of back-to-back 8192-cube matmuls: TFLOP/s per window (then exit)")
    parser.add_argument("--libs", default="cublas,cublaslt", help="BLAS libraries to time (comma-separated)")
    parser.add_argument("--gemv", action="store_true", help="also the Triton GEMV (one token), each config")
    args = parser.parse_args()
    if args.sustained:
        from autodeploy.bench.roofline import matmul_rates_under_load

        torch.randn(8, device="cuda")
        time.sleep(1.0)  # a rested card first, as the roofline's burst finds it
        rates = [r / 1e12 for r in matmul_rates_under_load(torch.device("cuda"), args.sustained)]
        print(f"RESULT sustained 8192^3 bf16: first window {rates[0]:.0f} TFLOP/s, windows 2-5 "
              f"{[round(r) for r in rates[1:5]]}, median of the second half "
              f"{statistics.median(rates[len(rates) // 2:]):.0f}, "
              f"min {min(rates):.0f} ({len(rates)} windows of 20 matmuls)", flush=True)
        return
    rows = []
    if args.gemv:  # first: cuBLAS at m=1 and every GEMV config on the same weights
        from autodeploy.custom_ops.gemv import CONFIGS

        torch.backends.cuda.preferred_blas_library("cublas")
        for name, (n, k) in SHAPES.items():
            ws = weights(n, k)
            gb = n * k * 2 / 1e9
            base = time_gemm(n, k, 1, ws=ws)
            print(f"RESULT gemv {name:8s} cublas {base:8.2f} us {gb / base * 1e3:.2f} TB/s", flush=True)
            for cfg in CONFIGS:
                us = time_gemm(n, k, 1, gemv_config=cfg, ws=ws)
                rows.append({"lib": "gemv", "config": list(cfg), "m": 1, "gemm": name, "us": round(us, 2),
                             "cublas_us": round(base, 2)})
                print(f"RESULT gemv {name:8s} {str(cfg):16s} {us:8.2f} us {gb / us * 1e3:.2f} TB/s "
                      f"({base / us:.2f}x cublas)", flush=True)
            del ws
    libs = args.libs.split(",")
    for lib in libs:
        torch.backends.cuda.preferred_blas_library(lib)
        for m in (int(v) for v in args.m.split(",")):
            for name, (n, k) in SHAPES.items():
                us = time_gemm(n, k, m)
                gb = (n * k + m * (n + k)) * 2 / 1e9
                row = {"lib": lib, "m": m, "gemm": name, "n": n, "k": k, "us": round(us, 2),
                       "tb_s": round(gb / us * 1e3, 3), "tflop_s": round(2 * m * n * k / us * 1e-6, 1)}
                rows.append(row)
                print(f"RESULT {lib:8s} m={m:5d} {name:8s} {us:9.2f} us  {row['tb_s']:.2f} TB/s  "
                      f"{row['tflop_s']:.0f} TFLOP/s", flush=True)
    # per decode step of the 32-layer model: 32 x (qkv + o + gate_up + down) + lm_head
    for lib in libs:
        for m in sorted({r["m"] for r in rows}):
            t = {r["gemm"]: r["us"] for r in rows if r["lib"] == lib and r["m"] == m}
            step = 32 * (t["qkv"] + t["o"] + t["gate_up"] + t["down"]) + t["lm_head"]
            print(f"RESULT step {lib} m={m}: {step / 1e3:.3f} ms of GEMMs per forward", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemm_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
