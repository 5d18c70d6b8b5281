"""Small FP8 checkpoints of the tiny models, written the way HF and ModelOpt store them.

The quantization here is plain torch code of its own (per tensor, or block by block in a loop),
not the package's, so loading checks against the formats rather than against itself.
``write_fp8_checkpoint`` also writes the dequantized 16-bit checkpoint beside it: the HF reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn


def _per_tensor(w: torch.Tensor):
    scale = w.abs().max().float() / 448.0
    q = (w.float() / scale).clamp(-448, 448).to(FP8)
    return q, scale, q.float() * scale


def _blocks(w: torch.Tensor, bn: int, bk: int):
    rows, cols = w.shape
    nb, kb = -(-rows // bn), -(-cols // bk)
    q = torch.empty(rows, cols, dtype=FP8)
    scale = torch.empty(nb, kb)
    deq = torch.empty(rows, cols)
    for i in range(nb):
        for j in range(kb):
            block = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            s = block.abs().max() / 448.0
            scale[i, j] = s
            qb = (block / s).clamp(-448, 448).to(FP8)
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = qb
            deq[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = qb.float() * s
    return q, scale, deq


def quantized_modules(tensors: dict, exclude: tuple[str, ...]) -> list[str]:
    return [k[: -len(".weight")] for k, t in tensors.items()
            if k.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in k
            and not any(k[: -len(".weight")].endswith(e) for e in exclude)]


def write_fp8_checkpoint(src: Path, dst: Path, fmt: str = "hf", block: tuple[int, int] | None = None,
                         static: bool = False, exclude: tuple[str, ...] = ("lm_head",)) -> Path:
    """``src`` (a tiny model's directory) -> ``dst`` with every linear weight but ``exclude`` in FP8:
    ``fmt="hf"`` (``quantization_config`` quant_method fp8, ``weight_scale_inv`` per tensor or per
    ``block``, ``activation_scale`` if ``static``) or ``"modelopt"`` (``hf_quant_config.json``,
    ``weight_scale``/``input_scale`` per tensor). Returns the reference directory (``dst``.ref): the
    same model with the dequantized weights."""
    src, dst = Path(src), Path(dst)
    ref = dst.with_name(dst.name + ".ref")
    for d in (dst, ref):
        shutil.copytree(src, d, dirs_exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    out, deq = dict(tensors), dict(tensors)
    modules = quantized_modules(tensors, exclude)
    for module in modules:
        w = tensors[f"{module}.weight"]
        q, scale, dq = _blocks(w, *block) if block else _per_tensor(w)
        out[f"{module}.weight"] = q
        deq[f"{module}.weight"] = dq.to(w.dtype)
        if fmt == "hf":
            out[f"{module}.weight_scale_inv"] = scale
            if static:
                out[f"{module}.activation_scale"] = torch.tensor(8.0 / 448)
        else:
            out[f"{module}.weight_scale"] = scale
            out[f"{module}.input_scale"] = torch.tensor(8.0 / 448)
    save_file(out, str(dst / "model.safetensors"))
    save_file(deq, str(ref / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if fmt == "hf":
        config["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
            "weight_block_size": list(block) if block else None, "modules_to_not_convert": list(exclude),
        }
    else:
        (dst / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.19.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": list(exclude)},
        }))
    (dst / "config.json").write_text(json.dumps(config))
    return ref
