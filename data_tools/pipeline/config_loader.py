"""Build config dataclasses from YAML mappings, with errors that say where, what and how to fix.

Why hand-written: the errors must name the recipe location ("stages[2] (dedup).treshold"),
suggest the closest field name, and check input paths before any work; the loaders at hand
(pydantic comes with openai) would need as much code again to turn their errors into that.

Supported field types: bool, int, float, str, ``X | None``, ``list[X]``, ``dict[str, X]`` and
nested dataclasses. A field whose metadata has ``{"path": "file" | "dir" | "exists"}`` is an
input path: it must exist when the config is loaded (checked by :func:`check_input_paths`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any

from data_tools._common import DataToolError


def did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    """' did you mean 'x'?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _json_kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise DataToolError(f"{where}: expected a list, got {_json_kind(value)}")
        return [_convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DataToolError(f"{where}: expected a mapping, got {_json_kind(value)}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (bool, int, float, str) and (type(value) is not tp):
        raise DataToolError(f"{where}: expected {_type_name(tp)}, got {_json_kind(value)} ({value!r})")
    return value


def from_dict(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass ``cls`` from mapping ``data``; ``where`` prefixes every error.

    Unknown keys are refused with the closest known field suggested, because a typo'd option
    silently falling back to its default is the most expensive kind of mistake in a long run.
    The instance's ``check()`` (if any) runs last, for value ranges.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DataToolError(f"{where}: expected a mapping of {cls.__name__} fields, got {_json_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise DataToolError(f"{where}: unknown field {key!r}{did_you_mean(str(key), fields)} "
                                f"(fields: {', '.join(fields)})")
    values = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    try:
        instance = cls(**values)
    except TypeError as exc:  # a required field without a default
        raise DataToolError(f"{where}: {exc}") from None
    except DataToolError as exc:  # a check in __post_init__: say where, keep the error's type
        raise type(exc)(f"{where}: {exc}") from None
    if hasattr(instance, "check"):
        try:
            instance.check()
        except DataToolError as exc:
            raise DataToolError(f"{where}: {exc}") from None
    return instance


def check_input_paths(instance: Any, where: str) -> None:
    """Raise if any input path of ``instance`` (see module doc), nested ones included, is missing."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        kind = f.metadata.get("path")
        if kind and value:
            _check_path(value, kind, f"{where}.{f.name}")
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if dataclasses.is_dataclass(item):
                suffix = f"[{i}]" if isinstance(value, list) else ""
                check_input_paths(item, f"{where}.{f.name}{suffix}")


def _check_path(path: str, kind: str, where: str) -> None:
    exists = {"file": os.path.isfile, "dir": os.path.isdir, "exists": os.path.exists}[kind](path)
    if not exists:
        found = "is a directory" if os.path.isdir(path) else "is a file" if os.path.exists(path) else "does not exist"
        wanted = {"file": "a file", "dir": "a directory", "exists": "an existing path"}[kind]
        raise DataToolError(f"{where}: {path!r} {found}; expected {wanted} (relative paths are "
                            f"resolved from the current directory, {os.getcwd()!r})")


def to_dict(instance: Any) -> dict:
    """Plain-data form of a config (for fingerprints, manifests and Slurm job recipes)."""
    return dataclasses.asdict(instance)
