"""Model cards: short names that stand for a model without a hub download.

Two kinds:
- tiny models (``tiny_llama``, ``tiny_mixtral``, ``tiny_hybrid``): real HF directories with
  random weights and a tokenizer, built on first use (``tiny.py``);
- shape cards (``cards/<name>.json``): the ``config.json`` of a real model (Llama-3.1-8B/70B,
  Mixtral-8x7B), no weights and no tokenizer: the model is built on meta or randomly initialized.
"""

from __future__ import annotations

from pathlib import Path

from .tiny import TINY_SPECS

CARDS_DIR = Path(__file__).parent / "cards"


def shape_card_names() -> list[str]:
    return sorted(p.stem for p in CARDS_DIR.glob("*.json"))


def card_names() -> list[str]:
    return sorted(TINY_SPECS) + shape_card_names()


def shape_card_path(name: str) -> Path | None:
    """Path of the card's config JSON, or None if ``name`` is not a shape card."""
    path = CARDS_DIR / f"{name}.json"
    return path if path.is_file() else None


def is_tiny(name: str) -> bool:
    return name in TINY_SPECS
