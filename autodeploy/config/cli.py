"""Seed-style command-line flags -> Hydra overrides, so both styles work and mix.

``--model X``                          -> ``model=X`` for a card, else ``args.model=X`` (a dir or hub id)
``--args.world-size=2``                -> ``args.world_size=2``      (kebab-case keys become snake_case)
``--args.model-kwargs.num-hidden-layers 10`` -> ``++args.model_kwargs.num_hidden_layers=10``
``--yaml-extra a.yaml b.yaml``         -> ``yaml_extra=['a.yaml','b.yaml']`` (repeating the flag appends)
``--args.yaml-extra c.yaml``           -> ``args.yaml_extra=['c.yaml']``
``--dry-run`` / ``--benchmark.enabled`` -> ``dry_run=true`` / ``benchmark.enabled=true`` (only a bool
                                          key may go without a value)

Hydra's own flags (``--cfg``, ``-m``, ``--info``, ``-cd`` ...) pass through untouched. Keys below a
free-form dict (model_kwargs, tokenizer_kwargs, transforms), and the dict itself
(``args.model_kwargs={hidden_size:32}``), get ``++`` in both styles, so new keys need no ``+``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import ConfigError
from .schema import FREE_FORM_PATHS, ExperimentConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Hydra flags and whether they take a value
HYDRA_FLAGS = {
    "--help": False, "-h": False, "--hydra-help": False, "--version": False, "--resolve": False,
    "--multirun": False, "-m": False, "--run": False, "-r": False, "--shell-completion": False,
    "-sc": False, "--cfg": True, "-c": True, "--package": True, "-p": True, "--config-path": True,
    "-cp": True, "--config-name": True, "-cn": True, "--config-dir": True, "-cd": True,
    "--experimental-rerun": True, "--info": None, "-i": None,  # None: optional value
}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
LIST_FLAGS = {"yaml_extra", "args.yaml_extra"}
_SAFE_VALUE = re.compile(r"^[^\s'\"]*$")


def model_cards() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _hydra_flag_len(argv: list[str], i: int) -> int:
    """How many tokens the Hydra flag at ``argv[i]`` spans (0: not a Hydra flag)."""
    flag, _, inline = argv[i].partition("=")
    if flag not in HYDRA_FLAGS:
        return 0
    takes = HYDRA_FLAGS[flag]
    has_next = not inline and i + 1 < len(argv)
    return 2 if has_next and (takes or (takes is None and argv[i + 1] in INFO_CHOICES)) else 1


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides) of a translated argument list."""
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        span = _hydra_flag_len(argv, i)
        if span:
            flags.extend(argv[i : i + span])
        else:
            overrides.append(argv[i])
        i += max(span, 1)
    return flags, overrides


def translate_argv(argv: list[str]) -> list[str]:
    """Return Hydra-style arguments for a mix of seed flags and Hydra overrides."""
    out: list[str] = []
    list_at: dict[str, int] = {}  # a repeated list flag extends the override of its first use
    i = 0
    while i < len(argv):
        span = _hydra_flag_len(argv, i)
        if span:
            out.extend(argv[i : i + span])
            i += span
            continue
        tok = argv[i]
        flag, _, inline = tok.partition("=")
        if tok.startswith("--"):
            key = flag[2:].replace("-", "_")
            if key in LIST_FLAGS:
                values = [inline] if inline else []
                while not inline and i + 1 < len(argv) and not _looks_like_option(argv[i + 1]):
                    values.append(argv[i + 1])
                    i += 1
                if not values:
                    raise ConfigError(f"{flag} needs at least one YAML file")
                quoted = [_quote(v) for v in values]
                if key in list_at:
                    first = out[list_at[key]]
                    out[list_at[key]] = f"{first[:-1]},{','.join(quoted)}]"
                else:
                    list_at[key] = len(out)
                    out.append(f"{key}=[{','.join(quoted)}]")
                i += 1
                continue
            if inline or "=" in tok:
                value = inline
            elif i + 1 < len(argv) and not _looks_like_option(argv[i + 1]):
                value = argv[i + 1]
                i += 1
            elif _takes_value(key):
                raise ConfigError(f"{flag} needs a value, e.g. {flag}=VALUE ({key} is {_type_name(key)})")
            else:
                value = "true"  # implicit boolean flag, e.g. --dry-run
            out.extend(_override(key, value))
            i += 1
            continue
        out.extend(_hydra_override(tok))
        i += 1
    return out


def _looks_like_option(tok: str) -> bool:
    """A flag or a Hydra override (key=value), not the value of the previous flag."""
    return tok.startswith("-") or re.match(r"^[+~]*[\w./-]+=", tok) is not None


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _value(value: str) -> str:
    # lists/dicts are already in Hydra's grammar; plain values are quoted only when they must be
    return value if _SAFE_VALUE.match(value) or value.startswith(("[", "{")) else _quote(value)


def _override(key: str, value: str) -> list[str]:
    if key == "model":
        return _model_override(value)
    return [f"{_prefix(key)}{key}={_value(value)}"]


def _model_override(value: str) -> list[str]:
    """`model` is a config group: a card selects its option (its args become the defaults) and,
    like a path or hub id, is also set through the `args.model` alias at command-line level."""
    if "," in value or value.startswith(("glob(", "choice(")):
        return [f"model={value}"]  # a sweep over cards
    if value in model_cards():
        return [f"model={value}", f"args.model={value}"]
    return [f"args.model={_value(value)}"]


def _prefix(key: str) -> str:
    return "++" if any(key == p or key.startswith(p + ".") for p in FREE_FORM_PATHS) else ""


def _hydra_override(tok: str) -> list[str]:
    """Native Hydra override: add ``++`` below free-form dicts and route models like --model."""
    if "=" not in tok or tok.startswith(("+", "~")):
        return [tok]
    key, value = tok.split("=", 1)
    if key == "model":
        return _model_override(value)
    return [_prefix(key) + tok]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def config_groups() -> set[str]:
    return {str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*") if p.is_dir() and p.name != "__pycache__"}


def is_group_override(override: str, groups: set[str]) -> bool:
    """A group choice (``model=...``, ``transforms/compile=...``) or one of Hydra's own keys."""
    key = override_key(override)
    return key in groups or "/" in key or key.split(".")[0] == "hydra"


def key_overrides(overrides: list[str], groups: set[str]) -> list[str]:
    """The overrides that set or delete a config key (not flags, group choices or Hydra keys)."""
    return [
        ov for ov in overrides
        if not ov.startswith("-") and ("=" in ov or ov.startswith("~")) and not is_group_override(ov, groups)
    ]


def validate_override_keys(overrides: list[str]) -> None:
    """Fail fast on a key the schema doesn't have, naming the closest valid keys."""
    for ov in key_overrides(overrides, config_groups()):
        _check_path(override_key(ov).split("."))


def schema_type(key: str) -> Any:
    """The schema type at a dotted key (None: unknown key or below a free-form dict)."""
    node: Any = ExperimentConfig
    for part in key.split("."):
        if not (isinstance(node, type) and is_dataclass(node)) or part not in {f.name for f in fields(node)}:
            return None
        node = _unwrap(get_type_hints(node)[part])
    return node


def _takes_value(key: str) -> bool:
    tp = schema_type(key)
    return tp is not None and tp is not bool


def _type_name(key: str) -> str:
    tp = schema_type(key)
    names = {int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, "a list or mapping" if get_origin(tp) in (list, dict) else "not a bool")


def _check_path(parts: list[str]) -> None:
    node: Any = ExperimentConfig
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        if any(path.startswith(p + ".") for p in FREE_FORM_PATHS):
            return
        if not (isinstance(node, type) and is_dataclass(node)):
            raise ConfigError(f"'{'.'.join(parts[:depth])}' has no sub-keys (got '{path}')")
        hints = get_type_hints(node)
        names = [f.name for f in fields(node)]
        if part not in names:
            where = ".".join(parts[:depth]) or "the config"
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join('.'.join(parts[:depth] + [c]) for c in close)}?" if close else ""
            raise ConfigError(f"unknown key '{path}': {where} has no field '{part}'.{hint}")
        node = _unwrap(hints[part])


def _unwrap(tp: Any) -> Any:
    if get_origin(tp) is not None and type(None) in get_args(tp):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp
