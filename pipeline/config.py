"""Frozen dataclass configs, filled from YAML files in configs/ and `key.sub=value` overrides.

Unknown keys are errors that name the key and list the valid ones, so a typo in a config file never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override a user can fix."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str, base: Any = None) -> Any:
    """``value`` as type ``tp``; a mapping for a dataclass changes only the fields it names of ``base`` (the
    field's default or the file's value), the rest kept."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where, base=base if isinstance(base, tp) else None)
    if origin in (tuple, list):
        if isinstance(value, dict):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if not isinstance(value, (list, tuple)):  # `--set inputs=a.json`: a list of one
            value = [value]
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return origin(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, where, base) if len(options) == 1 else value
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float and isinstance(value, str):
        return _float(value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if origin is typing.Literal and value not in typing.get_args(tp):
        raise ConfigError(f"{where}: must be one of {typing.get_args(tp)}, got {value!r}")
    return value


def _float(text: str, where: str) -> float:
    """A float field given as text: YAML 1.1 reads `1e-4` (no dot) as a string."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {text!r}") from None


def from_dict(cls: type[T], data: dict, *, where: str = "config", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a (nested) dict, checking keys and simple types: the fields ``data`` names
    replace those of ``base`` (default: ``cls``'s defaults). A nested section names only what it changes: the
    nested default's other fields are kept (``engine.max_num_seqs=8`` keeps the engine's default policy)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(fields)}")

    def default(name: str) -> Any:
        if base is not None:
            return getattr(base, name)
        field = fields[name]
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        return None if field.default is dataclasses.MISSING else field.default

    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}", default(k) if isinstance(v, dict) else None)
              for k, v in data.items()}
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    data[leaf] = value


def load_config(
    cls: type[T],
    path: str | pathlib.Path | None = None,
    overrides: Iterable[str] = (),
    values: dict[str, Any] | None = None,
) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``values`` (dotted keys to typed values,
    e.g. from command-line flags; None values are skipped), then ``key.sub=value`` overrides (YAML values)."""
    data: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = _yaml(path.read_text(), f"config file {path}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    for key, value in (values or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. workload.num_requests=1000)")
        _set_dotted(data, key.strip(), _yaml(raw, f"override {item!r}"))
    return from_dict(cls, data, where=str(path) if path else "config")


def _yaml(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}") from None
