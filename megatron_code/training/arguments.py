"""Command line -> RunConfig. Precedence: dataclass defaults < --preset < --config FILE.yaml <
explicit flags. The parser is generated from the config dataclasses, so every field is a flag with
its docstring as help, and no flag exists without a field behind it."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing

import yaml

from megatron_code.config_docs import field_docs
from megatron_code.errors import ConfigError
from megatron_code.presets import get_preset
from megatron_code.training.config import RunConfig

SECTIONS = [f.name for f in dataclasses.fields(RunConfig)]


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in SECTIONS}


def _field_owner() -> dict[str, str]:
    """Field name -> the RunConfig section that owns it (field names are unique across sections)."""
    owner = {}
    for section, cls in _section_classes().items():
        for f in dataclasses.fields(cls):
            assert f.name not in owner, f"duplicate config field {f.name}"
            owner[f.name] = section
    return owner


def _unwrap_optional(hint):
    """`int | None` -> int; other hints unchanged."""
    args = typing.get_args(hint)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner
    return hint


def _field_types() -> dict[str, object]:
    types = {}
    for cls in _section_classes().values():
        types.update({k: _unwrap_optional(v) for k, v in typing.get_type_hints(cls).items()})
    return types


def _coerce(name: str, value, kind, source: str):
    """Give a YAML/preset value the field's type (YAML reads `1e-3` as a string, `3` as an int)."""
    if value is None or kind is typing.Any:
        return value
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if typing.get_origin(kind) is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split()
        return kind(value)
    except (TypeError, ValueError):
        expected = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{source}: field {name!r} expects {expected}, got {value!r}.") from None


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _add_field_argument(group, f: dataclasses.Field, hint, doc: str) -> None:
    name = f.name
    flag = "--" + name.replace("_", "-")
    kind = _unwrap_optional(hint)
    # Defaults are SUPPRESSed so that only flags actually given override the preset and YAML file;
    # the dataclass default is shown in the help text instead.
    help_text = f"{doc} (default: {_field_default(f)})".replace("%", "%%")
    kwargs = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(kind) is list:
        group.add_argument(flag, nargs="+", type=str, **kwargs)
    else:
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag, type=kind, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcode-train",
        description="Pretrain a GQA + RoPE decoder on Megatron .bin/.idx data.",
    )
    parser.add_argument("--preset", default=None, help="Named preset (tiny, 125m, 1b, 7b, 7b-128k).")
    parser.add_argument("--config", default=None, help="YAML file of field: value pairs (flat or by section).")
    for section, cls in _section_classes().items():
        group = parser.add_argument_group(section, cls.__doc__.splitlines()[0])
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field_argument(group, f, hints[f.name], docs.get(f.name, ""))
    return parser


def load_yaml_config(path: str) -> dict:
    """Read a YAML config: flat `{field: value}` or sectioned `{model: {field: value}, ...}`.
    Keys may use dashes or underscores. Unknown keys are an error naming file and key."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path!r}.")
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field: value, got {type(raw).__name__}.")
    flat = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    flat = {str(k).replace("-", "_"): v for k, v in flat.items()}
    return _typed(flat, f"--config {path}")


def _typed(values: dict, source: str) -> dict:
    _reject_unknown(values, source)
    types = _field_types()
    return {k: _coerce(k, v, types[k], source) for k, v in values.items()}


def _reject_unknown(values: dict, source: str) -> None:
    known = _field_owner()
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{source}: unknown field {key!r}.{hint}")


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse flags into a RunConfig (not yet validated against files: see validate_run)."""
    args = vars(build_parser().parse_args(argv))
    preset, config_file = args.pop("preset"), args.pop("config")
    values = _typed(get_preset(preset), f"--preset {preset}") if preset else {}
    if config_file:
        values.update(load_yaml_config(config_file))
    values.update(args)
    return run_config_from_values(values)


def run_config_from_values(values: dict) -> RunConfig:
    """Build a RunConfig from a flat {field: value} mapping (defaults fill the rest)."""
    _reject_unknown(values, "config")
    owner, per_section = _field_owner(), {s: {} for s in SECTIONS}
    for key, value in values.items():
        per_section[owner[key]][key] = value
    try:
        return RunConfig(**{s: cls(**per_section[s]) for s, cls in _section_classes().items()})
    except TypeError as exc:
        raise ConfigError(f"bad config value: {exc}") from exc
