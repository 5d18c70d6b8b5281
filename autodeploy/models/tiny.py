"""Tiny, real HF models (random weights + a trained tokenizer) for fast CPU tests and demos.

Three families, each small enough for CPU tests but with the features that matter:
``tiny_llama`` (dense, GQA), ``tiny_mixtral`` (MoE, 4 experts top-2, transformers-5 fused experts),
``tiny_hybrid`` (NemotronH: Mamba2 + attention + MLP layers). A model is built on first use into
``$AUTODEPLOY_CACHE/tiny/<name>-<hash>`` (default ``~/.cache/autodeploy``); the hash covers the
spec and the library versions that write the files, so the same spec gives the same files. Builds
go to a temp dir that is renamed into place, so parallel test workers never see half a model.

    ensure_tiny_model("tiny_llama") -> Path
    python -m autodeploy.models.tiny --family llama --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# bump when the builder changes what it writes
_BUILDER_VERSION = 1

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: H != KV
    "head_dim": 16,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    # larger than HF's 0.02 so logits are spread out and greedy choices are not near-ties
    "initializer_range": 0.08,
}

TINY_SPECS: dict[str, dict[str, Any]] = {
    "tiny_llama": {
        "family": "llama",
        "model_type": "llama",
        "vocab_size": 512,
        "seed": 0,
        "config": {
            **_COMMON,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
        },
    },
    "tiny_mixtral": {
        "family": "mixtral",
        "model_type": "mixtral",
        "vocab_size": 512,
        "seed": 1,
        "config": {
            **_COMMON,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "router_jitter_noise": 0.0,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
        },
    },
    "tiny_hybrid": {
        "family": "hybrid",
        "model_type": "nemotron_h",
        "vocab_size": 512,
        "seed": 2,
        "config": {
            **_COMMON,
            # one layer of each kind, and a second Mamba layer after the MLP
            "layers_block_type": ["linear_attention", "full_attention", "mlp", "linear_attention"],
            "intermediate_size": 128,
            "mamba_num_heads": 8,
            "mamba_head_dim": 16,
            "ssm_state_size": 16,
            "n_groups": 2,
            "conv_kernel": 4,
            # small chunks so test sequences span several chunks and end mid-chunk
            "chunk_size": 16,
            "use_conv_bias": True,
            "use_bias": False,
            "mlp_hidden_act": "relu2",
            "layer_norm_epsilon": 1e-5,
        },
    },
}

FAMILY_TO_NAME = {spec["family"]: name for name, spec in TINY_SPECS.items()}


def cache_root() -> Path:
    # an empty value counts as unset (it would otherwise mean the current directory)
    return Path(os.environ.get("AUTODEPLOY_CACHE") or Path.home() / ".cache" / "autodeploy").expanduser()


def spec_hash(name: str) -> str:
    import tokenizers
    import torch
    import transformers

    key = {
        "name": name,
        "spec": TINY_SPECS[name],
        "builder": _BUILDER_VERSION,
        # the files are written by these libraries; a new version may write them differently
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _check_name(name: str) -> None:
    if name not in TINY_SPECS:
        raise ValueError(f"unknown tiny model {name!r} (known: {', '.join(sorted(TINY_SPECS))})")


def ensure_tiny_model(name: str) -> Path:
    """Return the directory of tiny model ``name``, building it on first use."""
    _check_name(name)
    final = cache_root() / "tiny" / f"{name}-{spec_hash(name)}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build_tiny_model(name, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            # another process renamed its copy into place first; theirs is identical
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_model(name: str, out_dir: Path) -> Path:
    """Write config, safetensors weights and tokenizer of tiny model ``name`` into ``out_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .tiny_tokenizer import save_tokenizer, train_tokenizer

    _check_name(name)
    spec = TINY_SPECS[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(spec["vocab_size"], seed=spec["seed"])
    special_ids = save_tokenizer(tokenizer, out_dir, model_max_length=spec["config"]["max_position_embeddings"])
    config = AutoConfig.for_model(
        spec["model_type"], vocab_size=tokenizer.get_vocab_size(), dtype="float32", **special_ids, **spec["config"]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out_dir))
    (out_dir / "autodeploy_tiny.json").write_text(
        json.dumps({"name": name, "hash": spec_hash(name), "spec": spec}, indent=2, sort_keys=True) + "\n"
    )
    return out_dir


@contextlib.contextmanager
def _quiet_transformers():
    # the Mamba mixers warn that the CUDA kernels are missing; expected on CPU
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny HF model (weights + tokenizer) into a directory.")
    parser.add_argument("--family", required=True, choices=sorted(FAMILY_TO_NAME))
    parser.add_argument("--out", required=True, type=Path, help="output directory (created; must be empty)")
    args = parser.parse_args(argv)
    out = args.out
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} exists and is not empty")
    build_tiny_model(FAMILY_TO_NAME[args.family], out)
    print(out)


if __name__ == "__main__":
    main()
