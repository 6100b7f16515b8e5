"""`setting()`: how the config sections declare a field, its help text and flags kept in the field's metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

# Field metadata: a setting read at each training step rather than built into the weights or the saved item
# vectors, so a run continued from a saved folder (training.init_from) may change it.
PER_STEP = "per_step"
# Field metadata: a setting a resumed run may change (see `resumable_settings`).
RESUMABLE = "resumable"


def setting(default: Any = dataclasses.MISSING, help: str = "", *,
            default_factory: Callable[[], Any] = dataclasses.MISSING, per_step: bool = False,
            resumable: bool = False) -> Any:
    """A dataclass field with its help text under metadata["help"] (PEFT's convention), as the YAML loader, the
    command line and the docs read it: `seed: int = setting(42, "Seed of ...")`."""
    if not help:
        raise TypeError("setting() needs the field's help text.")
    metadata: dict[str, Any] = {"help": help}
    if per_step:
        metadata[PER_STEP] = True
    if resumable:
        metadata[RESUMABLE] = True
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)
