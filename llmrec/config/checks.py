"""Checks shared by the config sections and the YAML loader."""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from ..errors import ConfigError

# Seeds go to random.seed, np.random.seed (which takes 0..2**32-1 only) and torch.manual_seed.
MAX_SEED = 2**32 - 1


def check_seed(name: str, value: int) -> None:
    """Refuse a seed that random / numpy / torch would reject (or silently wrap) at the start of training."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be an integer in 0..{MAX_SEED} (2**32 - 1), got {value}.")


def check_choice(name: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}.")



def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False

