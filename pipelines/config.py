"""One way to configure: frozen pydantic models loaded from YAML with ``--set key=value`` overrides.

Every stage's configuration is a tree of ``Config`` models (frozen, ``extra="forbid"``, ranges as
``Field(ge=…, le=…)``). ``load_config`` builds one from (in increasing priority) the defaults, a
YAML file, a mapping of explicit values (the command-line flags) and ``--set`` overrides with
dotted keys; a bad value raises ``ConfigError`` naming the key and what is allowed.

Fields that do not change what a stage writes (batch sizes, concurrency, GPUs, where the output
goes) are declared with ``resource()``; ``config_hash`` leaves them out, so scaling a job up does
not look like a different output to resume logic and manifests. The hash is sha256 of the
output-affecting fields as sorted JSON (tuples as lists), the same bytes the dataclass configs of
earlier versions hashed, so their outputs still resume (``tests/test_config.py`` pins them).
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.errors import UserError

T = TypeVar("T")

_RESOURCE = "recompose.resource"
_ADDED = "recompose.added"


class ConfigError(UserError):
    """A configuration value or key is invalid; the message names it."""


class Config(BaseModel):
    """Base of every configuration section: frozen, unknown keys refused, numbers as strings
    accepted where YAML 1.1 leaves them strings (``1e-4``), a comma list for a tuple field."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _split_comma_lists(cls, data: Any) -> Any:
        # `--set conditions=palette,sketch` arrives as one string; a tuple field takes its items.
        if not isinstance(data, Mapping):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            value = out.get(name)
            if isinstance(value, str) and typing.get_origin(field.annotation) is tuple:
                out[name] = [v.strip() for v in value.split(",") if v.strip()]
        return out


def resource(default: Any, **constraints: Any) -> Any:
    """A field that changes how fast a stage runs, never what it writes (excluded from hashes)."""
    return Field(default=default, json_schema_extra={_RESOURCE: True}, **constraints)


def added(default: Any, **constraints: Any) -> Any:
    """A field that changes what a stage writes but was added after outputs were hashed: left out
    of the hash while it holds ``default``, so outputs written before it existed still match."""
    return Field(default=default, json_schema_extra={_ADDED: True}, **constraints)


def nested(factory: type) -> Any:
    """A nested config section with its defaults."""
    return Field(default_factory=factory)


def _is_resource(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(_RESOURCE))


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


def _section(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config model at ``loc`` inside ``cls`` (None when ``loc`` leaves the config tree)."""
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        cls = field.annotation
    return cls


def _describe(cls: type[BaseModel], e: ValidationError, where: str) -> str:
    """One line per problem: the dotted key, then pydantic's reason (which states the range)."""
    lines = []
    for err in e.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(((where,) if where else ()) + loc) or cls.__name__
        if err["type"] == "extra_forbidden":
            section = _section(cls, loc[:-1])
            known = ", ".join(sorted(section.model_fields)) if section else "?"
            lines.append(f"unknown config key {key}; known: {known}")
        elif err["type"] in ("value_error", "assertion_error"):
            lines.append(f"{key}: {str(err.get('ctx', {}).get('error', err['msg']))}")
        else:
            lines.append(f"{key}: {err['msg']}, got {err.get('input')!r}")
    return "; ".join(lines)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the config ``cls`` from a nested mapping; ``ConfigError`` names every bad key."""
    try:
        return cls.model_validate(dict(data))  # type: ignore[attr-defined]
    except ValidationError as e:
        raise ConfigError(_describe(cls, e, where)) from None  # type: ignore[arg-type]


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    values: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Defaults < ``defaults`` (e.g. a parent run's config) < YAML file < explicit ``values``
    (dotted keys allowed) < ``--set`` overrides."""
    data: dict[str, Any] = _merge({}, dict(defaults)) if defaults else {}
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


def _plain(v: Any, outputs_only: bool) -> Any:
    if isinstance(v, BaseModel):
        return to_dict(v, outputs_only)
    if isinstance(v, tuple):
        return [_plain(x, outputs_only) for x in v]
    return v


def to_dict(cfg: Any, outputs_only: bool = False) -> dict[str, Any]:
    """The config as plain data (tuples as lists); ``outputs_only`` drops ``resource()`` fields and
    ``added()`` fields at their default."""
    return {
        name: _plain(getattr(cfg, name), outputs_only)
        for name, field in type(cfg).model_fields.items()
        if not (outputs_only and (_is_resource(field) or _at_added_default(field, getattr(cfg, name))))
    }


def _at_added_default(field: Any, value: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(_ADDED)) and value == field.default


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
        if isinstance(v, dict) and isinstance(getattr(cfg, k), (BaseModel,)):
            out.update(flatten(getattr(cfg, k), f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
