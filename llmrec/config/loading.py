"""Reading a config: YAML file < command-line overrides, coerced onto the typed sections."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..errors import ConfigError
from .checks import unwrap_optional
from .experiment import ExperimentConfig


def _unknown_key_error(section: str, key: str, known: list[str]) -> ConfigError:
    where = f"section '{section}'" if section else "the top level"
    close = difflib.get_close_matches(key, known, n=1) or [name for name in known if key in name][:1]
    hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."
    return ConfigError(f"Unknown config key '{key}' in {where}.{hint}")



def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML or command-line value into the field's declared type, or say why not."""
    annotation, optional = unwrap_optional(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be null.")
    if dataclasses.is_dataclass(annotation):
        if value is True:  # `lora: true` switches a section on with its defaults
            value = {}
        elif value is False and optional:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of {annotation.__name__} fields, got {value!r}.")
        return _build_dataclass(annotation, value, name)
    origin = typing.get_origin(annotation)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [part for part in value.split(",") if part]
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}.")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(f"{name}[{index}]", item, item_type) for index, item in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}.")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}.")
        try:
            number = annotation(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{name} must be {'an integer' if annotation is int else 'a number'}, got {value!r}.")
        if annotation is int and (not isinstance(number, int) or isinstance(number, bool)):
            if isinstance(number, float) and number.is_integer():
                return int(number)
            raise ConfigError(f"{name} must be an integer, got {value!r}.")
        if annotation is float and not isinstance(number, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}.")
        if annotation is float and not math.isfinite(number):  # nan would pass every `<= 0` check
            raise ConfigError(f"{name} must be a finite number, got {value!r}.")
        return annotation(number)
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name} must be a string, got {value!r}.")
        return str(value)
    return value


def _build_dataclass(cls: type, values: dict[str, Any], section: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key in getattr(cls, "RENAMED_KEYS", {}):
            new_key = cls.RENAMED_KEYS[key]
            raise ConfigError(f"Config key '{section}.{key}' is now '{section}.{new_key}' (PEFT's name); rename it.")
        if key not in known:
            raise _unknown_key_error(section, key, known)
        kwargs[key] = _coerce(f"{section}.{key}" if section else key, value, hints[key])
    return cls(**kwargs)


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """Read ``--section.field value`` / ``--section.field=value`` pairs into a nested dict."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if not argument.startswith("--"):
            raise ConfigError(f"Unexpected argument {argument!r}; overrides look like --training.seed 7.")
        key = argument[2:]
        if "=" in key:
            key, raw_value = key.split("=", 1)
            index += 1
        else:
            if index + 1 >= len(arguments):
                raise ConfigError(f"Override {argument} has no value; write {argument} VALUE.")
            raw_value = arguments[index + 1]
            index += 2
        parts = key.replace("-", "_").split(".")
        value = _parse_override_value(parts, raw_value)
        node = overrides
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return overrides


def _parse_override_value(parts: list[str], raw_value: str) -> Any:
    """Text fields keep the text as typed (a template like '{title}' is not a YAML mapping); others are YAML."""
    annotation: Any = ExperimentConfig
    for part in parts:
        annotation, _ = unwrap_optional(annotation)
        hints = typing.get_type_hints(annotation) if dataclasses.is_dataclass(annotation) else {}
        if part not in hints:
            annotation = None
            break
        annotation = hints[part]
    if annotation is not None and unwrap_optional(annotation)[0] is str:
        return raw_value  # _coerce still reads 'null' as None for optional fields
    if raw_value == "":
        return ""
    try:
        return yaml.safe_load(raw_value)
    except yaml.YAMLError:  # e.g. ',' or '@': leave it to the field's type check to name the problem
        return raw_value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: Optional[Union[str, Path]] = None,
    overrides: Optional[Union[dict[str, Any], list[str]]] = None,
) -> ExperimentConfig:
    """Build a validated config from an optional YAML file and overrides (dict or CLI list)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; pass --config with a YAML file such as configs/ml100k.yaml.")
        values = _read_yaml(path)
        if not isinstance(values, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections, got {type(values).__name__}.")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values = _deep_merge(values, overrides or {})
    return _build_dataclass(ExperimentConfig, values).validate()


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error, not a silent 'last one wins'."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = key in first_lines
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if seen:
                raise ConfigError(
                    f"key {key!r} appears twice in one section (line {first_lines[key]} and line {line}); keep one."
                )
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"Config file {path} is not UTF-8 text (at byte offset {error.start}: {error.reason}); "
                          "save it as UTF-8.") from None
    except OSError as error:
        raise ConfigError(f"Config file {path} cannot be read ({error.strerror or error}).") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    except ConfigError as error:
        raise ConfigError(f"Config file {path}: {error}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line where yaml prints several (with the source line and a caret): where, and what is wrong."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}."
    return " ".join(str(error).split())


def save_config(config: ExperimentConfig, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
