"""Tiny models with more layers (random weights, the tiny tokenizer): graphs whose layers repeat,
for the regional compile (a two-layer tiny model has no middle region that repeats); and HF's
greedy tokens, the reference the compile tests compare with."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def deep_tiny_model(name: str, out_dir: Path, repeat: int = 2) -> Path:
    """``name``'s tiny model with its layers ``repeat`` times over (the hybrid's block pattern
    repeated), saved in ``out_dir``; built once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from autodeploy.models.tiny import ensure_tiny_model

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    src = ensure_tiny_model(name)
    shutil.copytree(src, out_dir, dirs_exist_ok=True)  # tokenizer files; config and weights replaced
    config = AutoConfig.from_pretrained(src)
    if getattr(config, "layers_block_type", None):
        config.layers_block_type = list(config.layers_block_type) * repeat
    else:
        config.num_hidden_layers *= repeat
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    return out_dir


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """The ``n`` tokens HF ``generate`` picks greedily after ``prompt`` (on ``hf``'s device)."""
    ids = torch.tensor([prompt], device=hf.device)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
