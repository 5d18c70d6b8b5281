"""Tab completion for the seed-style flags; Hydra completes everything else.

Hydra's bash completion calls ``launch.py -sc query=bash`` with the line in ``COMP_LINE``. A word
that starts with ``-`` is answered here (``--args.`` -> ``--args.max-seq-len=`` ..., one level at
a time; the value after ``--model`` -> the cards); for any other word the seed flags before it are
translated into Hydra overrides and Hydra answers as usual.
"""

from __future__ import annotations

from typing import Any

import yaml

from .cli import CONF_DIR, HYDRA_FLAGS, model_cards, schema_fields, translate_argv
from .errors import ConfigError
from .schema import FREE_FORM_PATHS, ExperimentConfig

SEED_ONLY_FLAGS = ["--model", "--yaml-extra", "--dry-run"]


def _kebab(path: str) -> str:
    return "--" + path.replace("_", "-")


def _schema_paths(node: Any = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every key of the schema as a flag: leaves end with '=', sections and free-form dicts with '.'."""
    out = []
    for name, tp in schema_fields(node).items():
        path = prefix + name
        if schema_fields(tp):
            out.append(_kebab(path) + ".")
            out.extend(_schema_paths(tp, path + "."))
        elif path in FREE_FORM_PATHS:
            out.extend([_kebab(path) + "=", _kebab(path) + "."])
        else:
            out.append(_kebab(path) + "=")
    return out


def _transform_names() -> list[str]:
    data = yaml.safe_load((CONF_DIR / "transforms" / "default.yaml").read_text()) or {}
    return [_kebab("args.transforms." + name) + "." for name in data if not str(name).startswith("_")]


def flag_candidates(word: str) -> list[str]:
    """Flags that complete ``word``, one level deeper than what is typed."""
    every = _schema_paths() + _transform_names() + SEED_ONLY_FLAGS + [f for f in HYDRA_FLAGS if f.startswith("--")]
    out = set()
    for flag in every:
        if not flag.startswith(word):
            continue
        rest = flag[len(word):]
        if rest and ("." not in rest.rstrip(".=") or flag in SEED_ONLY_FLAGS):
            out.add(flag)
    return sorted(out)


def complete(line: str) -> tuple[list[str] | None, str]:
    """(candidates, line for Hydra): candidates when the word is ours, else the translated line.

    ``line`` is COMP_LINE without the program (``python launch.py``).
    """
    words = line.split()
    current = "" if not words or line.endswith(" ") else words[-1]
    before = words[:-1] if current else words
    if current.startswith("-"):
        return flag_candidates(current), line
    if before and before[-1] == "--model":
        return [c for c in model_cards() if c.startswith(current)], line
    try:
        translated = translate_argv(before)
    except ConfigError:  # a half-typed seed flag: complete as if it were not there
        translated = [w for w in before if not w.startswith("-") or w.split("=")[0] in HYDRA_FLAGS]
    return None, " ".join(translated + [current])
