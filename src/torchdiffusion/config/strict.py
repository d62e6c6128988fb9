"""Strict loading of frozen config dataclasses from plain dicts (YAML data), with dotted overrides.

An unknown key fails with the closest valid key; a wrong type or an invalid value fails naming the key and
what is valid. Every failure is a ConfigError (exit code 2), never a traceback.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Callable, Mapping

import yaml

from ..errors import ConfigError


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, (int, float, str)) and args[-1] is Ellipsis else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not valid; valid: {', '.join(map(str, choices))}"
                              + (_suggest(str(value), [str(c) for c in choices])))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def kind_field(table: str, default: Callable[[], Any], *, mapping: bool = False):
    """A config field holding one of several config classes chosen by a `kind` key (a union keyed on kind):
    `table` names the registry table (config.registry.KINDS) that maps kinds to config classes. With
    mapping=True the field is a {name: config} mapping of such configs (e.g. the conditioners)."""
    return dataclasses.field(default_factory=default, metadata={"kinds": table, "mapping": mapping})


def derived_field(default: Any = None, why: str = "set from the data"):
    """A field of a component's config that a run config never holds: the builder fills it (e.g. a backbone's
    input channels from the data and codec). Direct users of the config class may still set it."""
    return dataclasses.field(default=default, metadata={"derived": why})


def _config_fields(cls) -> list:
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")]


def _coerce_kind(value: Any, table: str, where: str):
    from .registry import kind_entry, kinds_of
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value  # already a config object (e.g. a default)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'kind' key (one of {', '.join(kinds_of(table))}), "
                          f"got {value!r}")
    if "kind" not in value:
        raise ConfigError(f"{where}: needs a 'kind' key; valid kinds: {', '.join(kinds_of(table))}")
    entry = kind_entry(table, value["kind"], where)
    rest = {k: v for k, v in value.items() if k != "kind"}
    return from_dict(entry.config, rest, where, run_config=True)


def from_dict(cls, data: Mapping[str, Any], where: str = "", *, run_config: bool = False):
    """Build the frozen dataclass `cls` from `data`; missing keys take the defaults.

    A class with a `__migrate__(data) -> data` static method rewrites older layouts of its data first (run
    folders of earlier releases keep loading). Fields made with kind_field are unions keyed on `kind`; fields
    made with derived_field are refused inside a run config (run_config=True): the builder sets them."""
    migrate = getattr(cls, "__migrate__", None)
    if migrate is not None:
        data = migrate(dict(data))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _config_fields(cls)}
    valid = [n for n, f in fields.items() if not (run_config and "derived" in f.metadata)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_suggest(str(key), valid)}; "
                              f"valid keys{(' of ' + where) if where else ''}: {', '.join(valid)}")
        f = fields[key]
        if run_config and "derived" in f.metadata:
            raise ConfigError(f"{path} is {f.metadata['derived']}; remove it from the config")
        if "kinds" in f.metadata:
            if f.metadata["mapping"]:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{path}: expected a mapping of name -> {{kind: ...}}, got {value!r}")
                kwargs[key] = {str(k): _coerce_kind(v, f.metadata["kinds"], f"{path}.{k}") for k, v in value.items()}
            else:
                kwargs[key] = _coerce_kind(value, f.metadata["kinds"], path)
            continue
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def to_dict(obj) -> dict:
    """Plain (YAML/JSON-safe) dict of a config dataclass; tuples become lists. A kind_field value is written
    with its `kind` first; derived fields are left out below a kind_field (the builder sets them)."""
    from .registry import kind_name

    def conv(v, under_kind=False):
        if dataclasses.is_dataclass(v):
            out = {}
            for f in _config_fields(type(v)):
                if under_kind and "derived" in f.metadata:
                    continue
                x = getattr(v, f.name)
                if "kinds" in f.metadata:
                    if f.metadata["mapping"]:
                        out[f.name] = {k: {"kind": kind_name(f.metadata["kinds"], c), **conv(c, True)}
                                       for k, c in x.items()}
                    else:
                        out[f.name] = {"kind": kind_name(f.metadata["kinds"], x), **conv(x, True)}
                else:
                    out[f.name] = conv(x)
            return out
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v
    return conv(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], value parsed as YAML data)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.steps=100), got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. train.steps=100), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict `data` with each 'dotted.key=value' applied."""
    import copy
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def merge(base: dict, update: Mapping) -> dict:
    """Recursive dict merge (update wins)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path) -> dict:
    """safe_load only (RELIABILITY 17): a !!python tag is refused, nothing is executed."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{path}: refused YAML tag ({e.problem}); configs hold plain data only") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data
