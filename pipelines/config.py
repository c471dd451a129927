"""Typed, frozen configuration: dataclasses loaded from YAML with ``--set key=value`` overrides.

Every stage's configuration is a tree of frozen dataclasses validated in ``__post_init__``.
``load_config`` builds one from (in increasing priority) the defaults, a YAML file, a mapping
of explicit values (the command-line flags) and ``--set`` overrides with dotted keys.

Fields that do not change what a stage writes (batch sizes, concurrency, GPUs) are declared with
``resource()``; ``config_hash`` leaves them out, so scaling a job up does not look like a
different output to resume logic and manifests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_RESOURCE = "recompose.resource"


def resource(default: Any) -> Any:
    """A field that changes how fast a stage runs, never what it writes (excluded from hashes)."""
    return dataclasses.field(default=default, metadata={_RESOURCE: True})


def nested(factory: type) -> Any:
    """A nested config section with its defaults."""
    return dataclasses.field(default_factory=factory)


def add_config_arguments(p: Any, configs: str, example: str) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE`` on the argparse parser ``p`` (every
    job takes both; ``load_config`` applies them). ``configs``: where example files are;
    ``example``: an override to show."""
    p.add_argument("--config", default=None, help=f"YAML config file (see {configs})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``["a.b=1", "c=[x, y]"]`` into ``{"a.b": 1, "c": ["x", "y"]}`` (values are YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {p!r} is not a section")
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_t = args[0] if args else Any
        return tuple(_coerce(item_t, v, f"{where}[]") for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join((where + '.' if where else '') + u for u in unknown)}; "
            f"known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    values: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
) -> T:
    """Defaults < YAML file < explicit ``values`` (dotted keys allowed) < ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level")
        data = _merge(data, loaded)
    if values:
        data = _merge(data, _nest({k: v for k, v in values.items() if v is not None}))
    data = _merge(data, _nest(parse_overrides(overrides)))
    return from_dict(cls, data)


def to_dict(cfg: Any, outputs_only: bool = False) -> dict[str, Any]:
    """The config as plain data; ``outputs_only`` drops ``resource()`` fields."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if outputs_only and f.metadata.get(_RESOURCE):
            continue
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v, outputs_only)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def hash_data(data: Any) -> str:
    """sha256 (first 16 hex digits) of JSON-able data, key order ignored."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(cfg: Any) -> str:
    """``hash_data`` of the output-affecting part of a config (``resource()`` fields left out)."""
    return hash_data(to_dict(cfg, outputs_only=True))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in to_dict(cfg).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and dataclasses.is_dataclass(getattr(cfg, k)):
            out.update(flatten(getattr(cfg, k), key + "."))
        else:
            out[key] = v
    return out
