"""Reading a job's YAML config with `--set a.b=value` overrides, validated before any work starts."""

from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import fsspec
import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field."""


def apply_override(data: dict, assignment: str) -> None:
    """Set `section.field=value` in a nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects FIELD=VALUE, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {key} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as error:  # found by tests/test_fuzz.py: "--set a=[1" raised yaml's own error
        raise ConfigError(f"--set {path}: the value is not YAML: {error}") from None


def load_config(model: type[T], path: Optional[str] = None, overrides: Sequence[str] = ()) -> T:
    """Load YAML (any fsspec URL) into `model`, apply overrides, validate; errors name the field."""
    data: dict = {}
    if path:
        try:
            with fsspec.open(path, "r") as f:
                data = yaml.safe_load(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:  # found by tests/test_fuzz.py
            raise ConfigError(f"{path}: not a YAML file: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        lines = []
        for e in error.errors():
            field = ".".join(str(p) for p in e["loc"]) or "<root>"
            lines.append(f"{field}: {e['msg']}")
        raise ConfigError(f"invalid config{f' {path}' if path else ''}:\n  " + "\n  ".join(lines)) from None
