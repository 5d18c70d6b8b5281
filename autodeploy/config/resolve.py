"""The final experiment config: yaml_extra files, precedence, shortcuts and checks.

Layers, lowest first (each later layer wins, and deep merge keeps siblings):

1. built-in defaults: the config composed from the chosen group options (``model=llama3_8b``,
   ``backend=triton``, ``experiment=...``: a group choice picks the defaults);
2. ``args.yaml_extra`` files, merged into ``args`` only, in order;
3. ``yaml_extra`` files, merged into the whole config, in order;
4. the command line's key overrides (``args.world_size=2``, ``--args.world-size=2``), even
   when they equal the default value.

Within one layer ``args.model`` beats ``model`` and a shortcut (``args.compile_backend`` ...) beats
its transform option; afterwards both sides of each pair agree.

A card selects its config-group option wherever it is named (``model=X``, ``--model X``, or
``model: X`` / ``args.model: X`` in a YAML file): its args are the defaults of layer 1, so every
file and the command line still win over them.
"""

from __future__ import annotations

import difflib
import logging
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .cli import is_group_override, key_overrides, model_cards, override_key
from .errors import ConfigError
from .schema import CHOICES, FREE_FORM_PATHS, MINIMUMS, SHORTCUTS

log = logging.getLogger(__name__)

Path_ = tuple  # a config path as a tuple of keys
Sets = list  # [(path, value)]


# ---------------------------------------------------------------- layers


def _flatten(d: Any, prefix: Path_ = ()) -> Sets:
    """Leaves of a nested dict as (path, value); lists and empty dicts are leaves."""
    if isinstance(d, dict) and d:
        out: Sets = []
        for k, v in d.items():
            out.extend(_flatten(v, prefix + (k,)))
        return out
    return [(prefix, d)] if prefix else []


def _normalize(sets: Sets) -> Sets:
    """Rewrite aliases onto their targets; alias writes go last so they win within the layer."""
    plain, alias = [], []
    for path, value in sets:
        if path == ("args", "model"):
            if value is not None:
                alias.append((("model",), value))
        elif len(path) == 2 and path[0] == "args" and path[1] in SHORTCUTS:
            if value is not None:
                name, option = SHORTCUTS[path[1]]
                alias.append((("args", "transforms", name, option), value))
        else:
            plain.append((path, value))
    return plain + alias


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(
                    f"duplicate key '{key}' at line {mark.line + 1} (first at line {seen[key] + 1})"
                )
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
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise ConfigError(f"{flag} file {path}{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def group_overrides(overrides: Iterable[str], groups: set[str]) -> list[str]:
    """The overrides that choose config-group options (they shape the defaults layer)."""
    return [ov for ov in overrides if not ov.startswith("-") and is_group_override(ov, groups)]


def _cli_layer(cli: DictConfig, overrides: Iterable[str], groups: set[str]):
    """Sets and deletions of the explicit key overrides, with the values Hydra parsed."""
    sets, deletes = [], []
    for ov in key_overrides(list(overrides), groups):
        key = override_key(ov)
        path = tuple(key.split("."))
        if ov.startswith("~"):
            deletes.append(path)
            continue
        value = OmegaConf.select(cli, key, throw_on_missing=False)
        value = OmegaConf.to_container(value, resolve=False) if isinstance(value, (DictConfig, ListConfig)) else value
        sets.extend(_flatten(value, path) if isinstance(value, dict) and value else [(path, value)])
    return _normalize(sets), deletes


# ---------------------------------------------------------------- applying


def _is_free_form(path: Path_) -> bool:
    dotted = ".".join(str(k) for k in path)
    return any(dotted == p or dotted.startswith(p + ".") for p in FREE_FORM_PATHS)


def _set(cfg: DictConfig, path: Path_, value: Any, source: str) -> None:
    node = cfg
    for i, key in enumerate(path):
        last = i == len(path) - 1
        free = _is_free_form(path[:i])  # the node we write into accepts any key
        if not free and key not in node:
            here = ".".join(path[:i]) or "the config"
            close = difflib.get_close_matches(str(key), [str(k) for k in node.keys()], n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join('.'.join(map(str, path[:i] + (c,))) for c in close)}?" if close else ""
            raise ConfigError(f"{source}: unknown key '{'.'.join(map(str, path))}': {here} has no field '{key}'.{hint}")
        try:
            if last and value == {} and isinstance(node.get(key), DictConfig) and not _is_free_form(path):
                return  # an empty mapping over a typed section sets nothing
            if last:
                with open_dict(node) if free else nullcontext():
                    node[key] = value
            else:
                child = node[key] if key in node else None
                if not isinstance(child, DictConfig):
                    with open_dict(node):
                        node[key] = {}
                    child = node[key]
                node = child
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            raise ConfigError(f"{source}: bad value for '{'.'.join(map(str, path))}': {msg}") from None


def _delete(cfg: DictConfig, path: Path_) -> None:
    parent = OmegaConf.select(cfg, ".".join(map(str, path[:-1]))) if len(path) > 1 else cfg
    if isinstance(parent, DictConfig) and path[-1] in parent and _is_free_form(path[:-1]):
        with open_dict(parent):
            del parent[path[-1]]


def _apply(defaults: DictConfig, layers: list[tuple[str, Sets]], cli_sets: Sets, cli_deletes: list) -> DictConfig:
    cfg = defaults.copy()
    OmegaConf.set_struct(cfg, True)
    for source, sets in layers:
        for path, value in sets:
            _set(cfg, path, value, source)
    for path in cli_deletes:
        _delete(cfg, path)
    for path, value in cli_sets:
        _set(cfg, path, value, "command line")
    return cfg


# ---------------------------------------------------------------- entry point


def resolve_experiment(
    cli: DictConfig, defaults: DictConfig, overrides: Iterable[str] = (), groups: set[str] | None = None,
    extra_layer: dict | None = None, compose_defaults: Callable[[str], DictConfig] | None = None,
) -> DictConfig:
    """Merge yaml_extra files under the command line, sync aliases and shortcuts, check values.

    ``cli`` is the config composed with every override, ``defaults`` the one composed with the
    group choices only (``group_overrides``). ``extra_layer`` (a nested dict, e.g. the LLM API's
    kwargs) sits at command-line level. ``compose_defaults("model=<card>")`` composes the defaults
    again with one more group choice: used when a file names a card that the group choices did not.
    """
    from .cli import config_groups

    overrides = list(overrides)
    groups = config_groups() if groups is None else groups
    cli_sets, cli_deletes = _cli_layer(cli, overrides, groups)
    if extra_layer:
        cli_sets = cli_sets + _normalize(_flatten(extra_layer))

    outer_files = _list(cli, "yaml_extra")
    for path, value in cli_sets:
        if path == ("yaml_extra",):
            outer_files = list(value or [])
    outer = [(f"yaml_extra file {f}", _normalize(_flatten(load_yaml(f, "yaml_extra")))) for f in outer_files]
    probe = _apply(defaults, outer, cli_sets, cli_deletes)
    inner_files = _list(probe, "args.yaml_extra")
    inner = [
        (f"args.yaml_extra file {f}", _normalize(_flatten({"args": load_yaml(f, "args.yaml_extra")})))
        for f in inner_files
    ]
    cfg = _apply(defaults, inner + outer, cli_sets, cli_deletes)
    card = cfg.get("model")
    if compose_defaults is not None and card != defaults.get("model") and card in model_cards():
        cfg = _apply(compose_defaults(f"model={card}"), inner + outer, cli_sets, cli_deletes)
    finalize(cfg)
    return cfg


def _list(cfg: DictConfig, key: str) -> list[str]:
    value = OmegaConf.select(cfg, key)
    return [str(v) for v in value] if value else []


def finalize(cfg: DictConfig) -> None:
    """Sync aliases and shortcuts, then check values that types alone can't."""
    args = cfg.args
    if not cfg.model:
        raise ConfigError("no model given: pass model=<card>, --model <card|dir|hub id>, or set `model:` in a YAML file")
    args.model = cfg.model
    for short, (name, option) in SHORTCUTS.items():
        transform = args.transforms.get(name)
        if isinstance(transform, DictConfig) and "stage" in transform:
            args[short] = transform.get(option)
        elif isinstance(transform, DictConfig):
            log.warning("args.%s has no effect: transform %s is not in the pipeline", short, name)
            with open_dict(args.transforms):
                del args.transforms[name]
    _check_values(cfg)
    _fit_limits(cfg)


def _check_values(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if key == "args.device" and isinstance(value, str) and re.fullmatch(r"cuda:\d+", value):
            continue
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")
    for key, minimum in MINIMUMS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < minimum:
            raise ConfigError(f"{key}={value} must be >= {minimum}")
    if any(b < 1 for b in cfg.benchmark.batch_sizes):
        raise ConfigError(f"benchmark.batch_sizes={list(cfg.benchmark.batch_sizes)} must all be >= 1")
    if not cfg.benchmark.request_rate > 0:
        raise ConfigError(f"benchmark.request_rate={cfg.benchmark.request_rate} must be > 0 (inf = all requests at once)")
    ratio = cfg.args.free_mem_ratio
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"args.free_mem_ratio={ratio} must be within [0, 1]")
    sp = cfg.prompt.sp_kwargs
    if sp.temperature < 0:
        raise ConfigError(f"prompt.sp_kwargs.temperature={sp.temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < sp.top_p <= 1.0:
        raise ConfigError(f"prompt.sp_kwargs.top_p={sp.top_p} must be within (0, 1]")
    if sp.top_k is not None and sp.top_k < 0:
        raise ConfigError(f"prompt.sp_kwargs.top_k={sp.top_k} must be >= 0 (0 or null = off)")
    if not isinstance(cfg.args.transforms, DictConfig):
        raise ConfigError("args.transforms must be a mapping of transform name -> options")
    for name, options in cfg.args.transforms.items():
        if not isinstance(options, DictConfig):
            raise ConfigError(f"args.transforms.{name} must be a mapping of options, got {options!r}")


def _fit_limits(cfg: DictConfig) -> None:
    """Raise limits that a requested batch would exceed (as the reference does), saying so."""
    args = cfg.args
    if cfg.prompt.batch_size > args.max_batch_size:
        log.info("args.max_batch_size raised from %d to prompt.batch_size=%d", args.max_batch_size, cfg.prompt.batch_size)
        args.max_batch_size = cfg.prompt.batch_size
    bench = cfg.benchmark
    if bench.enabled and not (bench.kind == "serve" and bench.url):  # a remote server has its own limits
        largest = max([bench.bs, *bench.batch_sizes]) if bench.kind == "offline" else bench.max_concurrency
        if largest is not None and largest > args.max_batch_size:
            log.info("args.max_batch_size raised from %d to the benchmark's batch size %d", args.max_batch_size, largest)
            args.max_batch_size = largest
        if bench.isl + bench.osl > args.max_seq_len:
            log.info("args.max_seq_len raised from %d to benchmark isl+osl=%d", args.max_seq_len, bench.isl + bench.osl)
            args.max_seq_len = bench.isl + bench.osl


def validate_transforms(cfg: DictConfig) -> None:
    """Check every transform name and option against the registry (imports the transform library)."""
    from autodeploy.transforms.optimizer import plan_pipeline

    try:
        plan_pipeline(OmegaConf.to_container(cfg.args.transforms, resolve=True))
    except (KeyError, ValueError) as e:
        raise ConfigError(str(e).strip("'\"")) from None
    attention = cfg.args.transforms.get("insert_cached_attention")
    if isinstance(attention, DictConfig) and attention.get("backend") is not None:
        from autodeploy.custom_ops.cached_attention import get_backend

        try:
            get_backend(attention.backend)
        except ValueError as e:  # an unknown name; whether a known one runs here is checked by preflight
            raise ConfigError(f"backend={attention.backend} (args.attn_backend): {e}") from None
        except RuntimeError:
            pass
