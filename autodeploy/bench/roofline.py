"""What the card could do at best, measured in the same run: the floors the benchmark compares to.

Decode is bound by memory: a step reads every weight but the embedding table (one row per token)
plus the K/V of every cached token of the batch, so its floor is
``(weight bytes + bs * context * KV bytes per token) / copy bandwidth``. Prefill is bound by
matmul: ``2 * parameters * tokens / matmul rate``. Both rates are measured here (a device-to-device
copy counting bytes read and written; a large bf16 matmul), because datasheet rates are not what a
card delivers (an H200 copies well below its datasheet's 4.8 TB/s: docs/performance.md). The matmul
rate is a burst (the card at its boost clock); the rate it holds after ~1 s of matmuls is measured
beside it (``matmul_sustained_tflop_s``: a power cap lowers the clocks), with the prefill floor at
that rate. CUDA only: on other devices there is no roofline (``None``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional

import torch
from torch import fx, nn

from ..compile.regions import nodes_through_regions


def _median_ms(fn, reps: int = 10) -> float:
    fn()  # warm-up (allocation, library handles)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device: torch.device, max_bytes: int = 2**30) -> float:
    """Bytes per second of a device-to-device copy (read + write), on random data."""
    free, _ = torch.cuda.mem_get_info(device)
    n = max(2**20, min(max_bytes, free // 4)) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3)


def _square_operands(device: torch.device, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random n x n matrices, n halved until they and the product fit in a quarter of free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    while n > 1024 and 3 * n * n * torch.finfo(dtype).bits // 8 > free // 4:
        n //= 2
    return torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """FLOP/s of an n x n x n matmul on random data (the ceiling a prefill GEMM can reach)."""
    a, b = _square_operands(device, dtype, n)
    ms = _median_ms(lambda: a @ b)
    return 2 * a.shape[0] ** 3 / (ms * 1e-3)


def matmul_rates_under_load(device: torch.device, seconds: float, n: int = 8192, window: int = 20) -> list[float]:
    """FLOP/s of back-to-back n-cube bf16 matmuls, per window of ``window`` matmuls, for about
    ``seconds``. A power-limited card lowers its clocks within ~0.1 s of such a load (the H200 at
    its 700 W cap: docs/performance-history.md#the-batch-32-prefill-meets-the-power-cap-h200-2026-12-01),
    and a batch of long prefills is such a load, so the burst rate of ``matmul_flops`` is a floor
    it cannot hold."""
    a, b = _square_operands(device, torch.bfloat16, n)
    n = a.shape[0]
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)
    events = [torch.cuda.Event(enable_timing=True)]
    events[0].record()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(window):
            torch.mm(a, b, out=out)
        events.append(torch.cuda.Event(enable_timing=True))
        events[-1].record()
        events[-1].synchronize()  # the host stays at most one window ahead
    return [2 * n**3 * window / (s.elapsed_time(e) * 1e-3) for s, e in zip(events, events[1:])]


def sustained_matmul_flops(device: torch.device, seconds: float = 1.0) -> float:
    """The median rate of the second half of ``seconds`` of back-to-back matmuls."""
    rates = matmul_rates_under_load(device, seconds)
    return statistics.median(rates[len(rates) // 2:])


def _graph(model: nn.Module) -> Optional[fx.GraphModule]:
    return next((m for m in model.modules() if isinstance(m, fx.GraphModule)), None)


def streamed_weights(model: nn.Module) -> tuple[int, int]:
    """(bytes, parameters) a decode step reads: every tensor the graph uses, but tables only
    looked up by ``embedding`` or indexing (one row per token: the embedding, RoPE's cos/sin
    tables; a tied LM head still reads the whole table)."""
    gm = _graph(model)
    if gm is None:
        return 0, 0
    lookups = (torch.ops.aten.embedding.default, torch.ops.aten.index.Tensor)
    only_looked_up: dict[object, bool] = {}  # graph node -> every use (in a compiled region too) a lookup in it
    for user, outer in nodes_through_regions(gm):
        for arg in user.all_input_nodes:
            table = outer(arg)
            lookup = user.target in lookups and outer(user.args[0]) is table
            only_looked_up[table] = only_looked_up.get(table, True) and lookup
    seen, nbytes, numel = set(), 0, 0
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        t = gm
        for part in node.target.split("."):
            t = getattr(t, part, None)
        if not isinstance(t, torch.Tensor) or t.data_ptr() in seen:
            continue
        if only_looked_up.get(node):
            continue
        seen.add(t.data_ptr())
        nbytes += t.numel() * t.element_size()
        numel += t.numel()
    return nbytes, numel


def measure(model: nn.Module, cache: Any) -> Optional[dict[str, Any]]:
    """Ceilings of this card and what this model streams; None off CUDA."""
    device = cache.device
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    weight_bytes, params = streamed_weights(model)
    return {
        "copy_bw_tb_s": copy_bandwidth(device) / 1e12,
        "matmul_tflop_s": matmul_flops(device) / 1e12,
        "matmul_sustained_tflop_s": sustained_matmul_flops(device) / 1e12,
        "weight_gb": weight_bytes / 1e9,
        "params": params,
        "kv_bytes_per_token": cache.bytes_per_page // cache.page_size if cache.specs else 0,
    }


def floors(ceilings: Optional[dict[str, Any]], bs: int, isl: int, osl: int) -> Optional[dict[str, float]]:
    """Decode step and prefill floors for one benchmark shape (mean context of the decode steps)."""
    if ceilings is None:
        return None
    context = isl + (osl - 1) / 2
    step_bytes = ceilings["weight_gb"] * 1e9 + bs * context * ceilings["kv_bytes_per_token"]
    step_ms = step_bytes / (ceilings["copy_bw_tb_s"] * 1e12) * 1e3
    prefill_ms = 2 * ceilings["params"] * isl / (ceilings["matmul_tflop_s"] * 1e12) * 1e3
    out = {"decode_step_floor_ms": step_ms, "decode_floor_tok_s": bs * 1e3 / step_ms, "prefill_floor_ms": prefill_ms}
    if ceilings.get("matmul_sustained_tflop_s"):  # the same work at the rate the card holds under load
        out["prefill_floor_sustained_ms"] = prefill_ms * ceilings["matmul_tflop_s"] / ceilings["matmul_sustained_tflop_s"]
    return out
