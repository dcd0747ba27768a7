"""Reading TOML configs into pydantic models, with errors that name the bad key.

Every config model in livestereo is a pydantic model with ``extra="forbid"`` and a
docstring per field. ``load_toml(path, Model)`` reads a file; a typo or a wrong type gives
a ``ConfigError`` such as::

    configs/daemon.toml: layout.radius_mrad: Input should be a valid number (got 'abc')
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from livestereo.protocol.codec import format_validation_error

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, key and expectation."""


def parse_config(data: dict[str, Any], model: type[M], source: str) -> M:
    """Validate a mapping against ``model``; ConfigError names ``source`` and the bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source).replace("; ", "\n")) from None


def load_toml(path: str | Path, model: type[M], overrides: dict[str, Any] | None = None) -> M:
    """Read ``path`` (TOML) into ``model``; ``overrides`` (dotted keys) win over the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return parse_config(data, model, str(path))


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted = 'a.b', creating tables on the way."""
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
