"""YAML configs mapped onto dataclasses.

Every stage of the kit reads YAML into `@dataclass` configs with `from_dict`, which rejects unknown
keys and wrong types with an error naming the file, the line and the key path. The loader records the
line of every mapping key so that errors point into the user's file, not at our code.

The CLI pattern follows timm's train.py: `-c config.yaml` gives the defaults, `--set a.b=value`
overrides any field, and the resolved config is dumped next to the results.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from members.contract.atomic import atomic_write_text  # re-exported: older imports keep working

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file, line and key."""


class _LinedDict(dict):
    """A dict that remembers the source line (1-based) of each key and the file it came from."""

    lines: dict[str, int]
    source: str


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LinedDict:
    seen: dict[str, int] = {}
    for key, _ in node.value:  # YAML lets a repeated key silently replace the first: refuse it
        line = key.start_mark.line + 1
        if str(key.value) in seen:
            raise ConfigError(f"{loader.name}, line {line}: key '{key.value}' repeats line {seen[str(key.value)]}; "
                              "keep one of them")
        seen[str(key.value)] = line
    mapping = _LinedDict(loader.construct_mapping(node, deep=True))
    mapping.lines = dict(seen)
    mapping.source = str(loader.name)
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, keeping key line numbers for error messages."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    with open(path, encoding="utf-8") as f:
        loader = _LineLoader(f)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        finally:
            loader.dispose()
    if data is None:
        data = _LinedDict()
        data.lines, data.source = {}, str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _merge(base: dict, update: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `update` replaces `base`."""
    merged = type(update)(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    for attr in ("lines", "source"):  # keep the child's file/line info for error messages
        if hasattr(update, attr):
            setattr(merged, attr, getattr(update, attr))
    return merged


def read_yaml_with_base(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping whose optional `base: other.yaml` (relative to this file) supplies defaults."""
    path = Path(path)
    here = path.resolve()
    if here in _chain:  # a cycle would recurse until RecursionError
        names = " -> ".join(str(p) for p in (*_chain, here))
        raise ConfigError(f"{path}: 'base:' chain loops back on itself: {names}; remove one of these 'base:' lines")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{_where(data, 'base', 'base')} expected the path of another YAML file, got {base!r}")
    return _merge(read_yaml_with_base(path.parent / base, (*_chain, here)), data)


def _where(data: Any, key: str, path: str) -> str:
    lines = getattr(data, "lines", {})
    source = getattr(data, "source", "config")
    line = lines.get(key)
    line = f", line {line}" if isinstance(line, int) else f" ({line})" if line else ""
    return f"{source}{line}: '{path}'"


def _coerce(value: Any, hint: Any, path: str, where: str) -> Any:
    """Check `value` (at key `path`, located by `where`) against a type hint; nested dataclasses are
    built recursively."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=path + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(v, item, path, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # a string too: YAML 1.1 reads `1e-3` (no dot) as one
            number = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # NaN passes every `< 0` check after this, and no setting is infinite
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise `ConfigError`."""
    data = {} if data is None else data
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{_where(data, key, prefix + str(key))} unknown key; "
                f"valid keys of '{prefix.rstrip('.') or cls.__name__}': {', '.join(sorted(names))}"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k, _where(data, k, prefix + k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        # A `__post_init__` check whose message starts with the dotted key it is about ("train.lr must
        # be > 0"): point at that key's line (or --set), as the type errors above do.
        key = next((k for k in data if str(err).startswith(f"{prefix}{k} ")), None)
        if key is not None:
            raise ConfigError(f"{_where(data, key, prefix + key)}: {str(err)[len(prefix + key) + 1:]}") from None
        source = getattr(data, "source", "config")
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or cls.__name__}': {err}") from None


def to_dict(config: Any) -> dict:
    """A dataclass config as plain dicts and lists (YAML- and JSON-safe)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if part not in node:  # a new section: errors inside it point at the override
                node[part] = _LinedDict()
                node[part].lines, node[part].source = {}, getattr(node, "source", "config")
                _mark(node, part, item)
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: invalid YAML value: {err}") from None
        _mark(node, leaf, item)
    return data


def _mark(node: dict, key: str, item: str) -> None:
    """Record that `key` came from `--set item`, so that errors about it name the override."""
    if hasattr(node, "lines"):
        node.lines[key] = f"--set {item}"


def dump_yaml(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config next to results, atomically."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else config
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
