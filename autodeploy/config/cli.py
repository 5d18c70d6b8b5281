"""The seed's syntax, at the edge: command line, YAML files and shortcuts -> one list of Hydra overrides.

``to_overrides`` reads the seed's flags (``--args.world-size=2``, ``--model X``, ``--yaml-extra a b``,
``--args.yaml-extra c``), Hydra overrides, the ``yaml_extra`` / ``args.yaml_extra`` files, cards named
inside them and the shortcut names (``args.attn_backend`` ...), and orders them so that Hydra's own
"later wins" gives the seed's precedence:

1. group choices (``model=<card>``, ``backend=triton``, ``experiment=...``): they pick the defaults;
2. each ``args.yaml_extra`` file's leaves, then each ``yaml_extra`` file's, in file order;
3. the command line (and the LLM API's keyword arguments).

Deep merge comes free: every leaf is its own override. Within one layer a shortcut beats its transform
option and ``args.model`` beats ``model``. The last model named anywhere is the run's model; a card also
picks the ``model`` group option, so its args are defaults under every file and the command line.
Kebab-case flag keys become snake_case; keys below a free-form dict get ``++`` (no ``+`` needed).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError
from .schema import FREE_FORM_PATHS, ExperimentConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Hydra flags and whether they take a value (None: optional)
HYDRA_FLAGS = {
    "--help": False, "-h": False, "--hydra-help": False, "--version": False, "--resolve": False,
    "--multirun": False, "-m": False, "--run": False, "-r": False, "--shell-completion": False,
    "-sc": False, "--cfg": True, "-c": True, "--package": True, "-p": True, "--config-path": True,
    "-cp": True, "--config-name": True, "-cn": True, "--config-dir": True, "-cd": True,
    "--experimental-rerun": True, "--info": None, "-i": None,
}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
LIST_FLAGS = {"yaml_extra", "args.yaml_extra"}
# shortcut -> (transform, option): an input name only; the transform option is the value's one home
SHORTCUTS = {
    "attn_backend": ("insert_cached_attention", "backend"),
    "compile_backend": ("compile_model", "backend"),
    "free_mem_ratio": ("resize_kv_cache", "free_mem_ratio"),
    "cuda_graph_batch_sizes": ("compile_model", "cuda_graph_batch_sizes"),
}
_SAFE_VALUE = re.compile(r"^[^\s'\"]*$")
_ID = re.compile(r"^[A-Za-z_][\w-]*$")


def model_cards() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def config_groups() -> set[str]:
    return {str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*") if p.is_dir() and p.name != "__pycache__"}


# ---------------------------------------------------------------- the command line's tokens


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
    flags, overrides, i = [], [], 0
    while i < len(argv):
        span = _hydra_flag_len(argv, i)
        (flags if span else overrides).extend(argv[i : i + max(span, 1)])
        i += max(span, 1)
    return flags, overrides


def translate_argv(argv: list[str]) -> list[str]:
    """Hydra-style arguments for a mix of seed flags and Hydra overrides (files are not read here)."""
    out: list[str] = []
    list_at: dict[str, int] = {}  # a repeated list flag extends the override of its first use
    i = 0
    while i < len(argv):
        span = _hydra_flag_len(argv, i)
        if span or not argv[i].startswith("--"):
            out.extend(argv[i : i + span] if span else _hydra_override(argv[i]))
            i += max(span, 1)
            continue
        flag, eq, inline = argv[i].partition("=")
        key = flag[2:].replace("-", "_")
        if key in LIST_FLAGS:
            values = [inline] if inline else []
            while not inline and i + 1 < len(argv) and not _looks_like_option(argv[i + 1]):
                values.append(argv[i + 1])
                i += 1
            if not values:
                raise ConfigError(f"{flag} needs at least one YAML file")
            quoted = ",".join(_quote(v) for v in values)
            if key in list_at:
                out[list_at[key]] = f"{out[list_at[key]][:-1]},{quoted}]"
            else:
                list_at[key] = len(out)
                out.append(f"{key}=[{quoted}]")
        else:
            if eq:
                value = inline
            elif i + 1 < len(argv) and not _looks_like_option(argv[i + 1]):
                value, i = argv[i + 1], i + 1
            elif schema_type(key) not in (None, bool):
                raise ConfigError(f"{flag} needs a value, e.g. {flag}=VALUE ({key} is {_type_name(key)})")
            else:
                value = "true"  # an implicit boolean flag, e.g. --dry-run
            safe = value if _SAFE_VALUE.match(value) or value.startswith(("[", "{")) else _quote(value)
            out.extend(_model_override(value) if key == "model" else [f"{_prefix(key)}{key}={safe}"])
        i += 1
    return out


def _looks_like_option(tok: str) -> bool:
    """A flag or a Hydra override (key=value), not the value of the previous flag."""
    return tok.startswith("-") or re.match(r"^[+~]*[\w./-]+=", tok) is not None


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _model_override(value: str) -> list[str]:
    """A card picks the ``model`` group option; any model (card, path, hub id) is also ``args.model``."""
    if "," in value or value.startswith(("glob(", "choice(")):
        return [f"model={value}"]  # a sweep over cards
    if value in model_cards():
        return [f"model={value}", f"args.model={value}"]
    return [f"args.model={value if _SAFE_VALUE.match(value) else _quote(value)}"]


def _prefix(key: str) -> str:
    return "++" if any(key == p or key.startswith(p + ".") for p in FREE_FORM_PATHS) else ""


def _hydra_override(tok: str) -> list[str]:
    if "=" not in tok or tok.startswith(("+", "~")):
        return [tok]
    key, value = tok.split("=", 1)
    return _model_override(value) if key == "model" else [_prefix(key) + tok]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def is_group_override(override: str, groups: set[str]) -> bool:
    """A group choice (``model=...``, ``transforms/compile=...``) or one of Hydra's own keys."""
    key = override_key(override)
    return key in groups or "/" in key or key.split(".")[0] == "hydra"


# ---------------------------------------------------------------- the adapter


def to_overrides(argv: list[str], extra_layer: dict | None = None, config_dir: str | None = None,
                 multirun: bool = False) -> tuple[list[str], list[str], dict[str, str]]:
    """(Hydra flags, the ordered overrides, where each override came from) for seed and Hydra syntax.

    ``extra_layer`` is a nested dict at the command line's precedence (the LLM API's keywords)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    flags, cli = split_argv(translate_argv(argv))
    config_dir = config_dir or flag_value(flags, "--config-dir", "-cd")
    groups, parse = config_groups(), OverridesParser.create().parse_override
    choices, cli_sets, cli_alias, cli_models, models = [], [], [], [], []
    files: dict[str, list[str]] = {"yaml_extra": [], "args.yaml_extra": []}
    for ov in cli:
        key = override_key(ov)
        if is_group_override(ov, groups):
            _check_option(key, ov.split("=", 1)[-1], config_dir, multirun)
            choices.append(ov)
            continue
        if "=" in ov or ov.startswith("~"):
            check_key(key.split("."), "command line")
        parsed = parse(ov) if "=" in ov else None
        value = parsed.value() if parsed is not None and not parsed.is_sweep_override() else None
        if key == "args.model" and value is not None:
            cli_models.append(str(value))
        elif key in LIST_FLAGS and isinstance(value, list):
            files[key] = [str(v) for v in value]
            cli_sets.append(ov)
        elif key.startswith("args.") and key[5:] in SHORTCUTS:
            name, option = SHORTCUTS[key[5:]]
            cli_alias.append(f"++args.transforms.{name}.{option}={ov.split('=', 1)[1]}")
        else:
            cli_sets.append(ov)
    sources = {ov: "command line" for ov in cli_sets + cli_alias}
    listed = ((extra_layer or {}).get("args") or {}).get("yaml_extra")  # LLM(yaml_extra=[...])
    if listed:
        files["args.yaml_extra"] = [str(v) for v in listed]
    outer = [(f"yaml_extra file {f}", load_yaml(f, "yaml_extra")) for f in files["yaml_extra"]]
    for _, data in outer:  # an outer file may list the args-level files; the command line's list wins
        listed = (data.get("args") or {}).get("yaml_extra") if isinstance(data.get("args"), dict) else None
        if listed and not any(override_key(ov) == "args.yaml_extra" for ov in cli_sets) and not extra_layer:
            files["args.yaml_extra"] = [str(v) for v in listed]
    inner = [(f"args.yaml_extra file {f}", {"args": load_yaml(f, "args.yaml_extra")}) for f in files["args.yaml_extra"]]
    layers = [_layer(data, source, models, sources) for source, data in inner + outer]
    models += cli_models
    if extra_layer:
        layers.append(_layer(extra_layer, "command line", models, sources))
    if models and models[-1] in model_cards():
        choices = [c for c in choices if override_key(c) != "model"] + [f"model={models[-1]}"]
    elif models:
        check_model_name(models[-1])
    last = [f"args.model={_render(models[-1])}"] if models else []
    ordered = choices + [ov for layer in layers[: len(inner) + len(outer)] for ov in layer] + cli_sets + cli_alias
    return flags, ordered + [ov for layer in layers[len(inner) + len(outer):] for ov in layer] + last, sources


def _layer(data: dict, source: str, models: list[str], sources: dict[str, str]) -> list[str]:
    """One file's leaves as overrides, in file order; its shortcuts and model go after its other leaves."""
    plain, alias = [], []
    for path, value in _leaves(data):
        check_key(list(path), source)
        if path in (("model",), ("args", "model")):
            if value is not None:
                alias.append(("model", value))
        elif len(path) == 2 and path[0] == "args" and path[1] in SHORTCUTS:
            if value is not None:
                alias.append((("args", "transforms", *SHORTCUTS[path[1]]), value))
        elif not (value == {} and not _is_free_form(".".join(path))):  # {} over a typed section sets nothing
            plain.append((path, value))
    out = []
    for path, value in plain + alias:
        if path == "model":
            models.append(str(value))
            continue
        key = ".".join(path)
        ov = f"{_prefix(key)}{key}={_render(value)}"
        sources[ov] = source
        out.append(ov)
    return out


def _leaves(d: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of each leaf; lists, empty dicts and dicts with keys Hydra can't address are leaves."""
    if isinstance(d, dict) and d and all(isinstance(k, str) and _ID.match(k) for k in d):
        return [leaf for k, v in d.items() for leaf in _leaves(v, path + (k,))]
    return [(path, d)] if path else []


def _render(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings always quoted, so '1.0' stays a string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_render(v)}" for k, v in value.items()) + "}"
    return _quote(str(value))


def _check_option(group: str, value: str, config_dir: str | None, multirun: bool) -> None:
    """A group option that does not exist: one line with the closest options (not Hydra's lookup error)."""
    if group == "hydra/launcher" and value in ("local", "slurm"):
        import importlib.util

        if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
            raise ConfigError(f"hydra/launcher={value} needs the slurm extra: pip install 'autodeploy[slurm]'")
    if group.startswith(("hydra", "+", "~")) or group not in config_groups() or (multirun and "," in value):
        return
    dirs = [CONF_DIR / group] + ([Path(config_dir) / group] if config_dir else [])
    options = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
    if value not in options and value != "null":
        close = difflib.get_close_matches(value, options, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"{group}={value} is not an option: {hint}(options: {', '.join(options)})")


def check_model_name(model: str) -> None:
    """A name close to a card, that is no path and no hub id, is a typo (caught here, not after a load)."""
    if "/" in model or Path(model).expanduser().exists():
        return
    close = difflib.get_close_matches(model, model_cards(), n=1, cutoff=0.75)
    if close:
        from autodeploy.models.cards import card_names  # the factory's message, before any model work

        raise ConfigError(f"unknown model {model!r}: did you mean {close[0]}? (cards: {', '.join(card_names())})")


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"duplicate key '{key}' at line {key_node.start_mark.line + 1} "
                                  f"(first at line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(path: str, flag: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{flag} file not found: {path} (looked at {p.resolve()})")
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{flag} file {path}: {e}") from None
    except yaml.YAMLError as e:
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{flag} file {path}{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")) from None
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"{flag} file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data or {}


# ---------------------------------------------------------------- keys against the schema


def _is_free_form(key: str) -> bool:
    return any(key.startswith(p + ".") for p in FREE_FORM_PATHS)


def _unwrap(tp: Any) -> Any:
    if get_origin(tp) is not None and type(None) in get_args(tp):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def schema_fields(node: Any) -> dict[str, Any]:
    """A schema section's fields and their types (``Optional`` unwrapped); {} for a leaf."""
    if not (isinstance(node, type) and is_dataclass(node)):
        return {}
    hints = get_type_hints(node)
    return {f.name: _unwrap(hints[f.name]) for f in fields(node)}


def schema_type(key: str) -> Any:
    """The schema type at a dotted key (None: unknown key or below a free-form dict)."""
    node: Any = ExperimentConfig
    for part in key.split("."):
        node = schema_fields(node).get(part)
    return node


def _type_name(key: str) -> str:
    tp = schema_type(key)
    names = {int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, "a list or mapping" if get_origin(tp) in (list, dict) else "not a bool")


def check_key(parts: list[str], source: str = "command line") -> None:
    """Fail fast on a key the schema doesn't have, naming the closest valid keys."""
    node: Any = ExperimentConfig
    prefix = "" if source == "command line" else f"{source}: "
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        if _is_free_form(path):
            return
        names = schema_fields(node)
        if not names:
            raise ConfigError(f"{prefix}'{'.'.join(parts[:depth])}' has no sub-keys (got '{path}')")
        if part not in names:
            where = ".".join(parts[:depth]) or "the config"
            close = difflib.get_close_matches(part, list(names), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join('.'.join(parts[:depth] + [c]) for c in close)}?" if close else ""
            raise ConfigError(f"{prefix}unknown key '{path}': {where} has no field '{part}'.{hint}")
        node = names[part]


def flag_value(flags: list[str], *names: str) -> str | None:
    """The value of a Hydra flag (``-cd DIR``, ``--config-dir=DIR``), or None."""
    for i, f in enumerate(flags):
        for n in names:
            if f == n and i + 1 < len(flags):
                return flags[i + 1]
            if f.startswith(n + "="):
                return f.split("=", 1)[1]
    return None
