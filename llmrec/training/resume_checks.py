"""Whether this run may resume a checkpoint: the same settings, the same data and the same number of processes.

A resumed run continues the interrupted one exactly only if nothing it depends on changed, so any
difference is refused with a ConfigError naming it; settings declared "resumable" in the config (such
as the number of epochs) may change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig, resumable_settings
from ..data import SequentialSplit
from ..errors import ConfigError


def check_resumable(trainer_state: dict[str, Any], config: ExperimentConfig, checkpoint: Path) -> None:
    """Refuse a checkpoint whose run had other data, model or training settings than `config`."""
    saved, current = _flatten(trainer_state["config"]), _flatten(config.to_dict())
    resumable = resumable_settings()  # declared on the config fields ("resumable" metadata)
    # A setting added to llmrec after the checkpoint was written had its default value in that run.
    defaults = _flatten(ExperimentConfig().to_dict())
    saved.update({name: defaults[name] for name in current.keys() - saved.keys() if name in defaults})
    differences = [
        f"{name}: {_shown(saved, name)} in the checkpoint, {_shown(current, name)} now"
        for name in sorted(set(saved) | set(current))
        if name not in resumable and (name in saved, saved.get(name)) != (name in current, current.get(name))
    ]
    if differences:
        raise ConfigError(
            f"Cannot resume from {checkpoint}: its run used a different configuration ({'; '.join(differences)}). "
            "Resume with the settings the checkpoint was trained with, or start a new run."
        )


def check_same_run_setup(trainer_state: dict[str, Any], checkpoint: Path, fingerprint: str, num_processes: int) -> None:
    """Refuse a checkpoint trained on other data (`data_fingerprint`) or by another number of processes."""
    if trainer_state["data_fingerprint"] != fingerprint:
        raise ConfigError(
            f"Cannot resume from {checkpoint}: the data (catalogue, training sequences or evaluation "
            "examples) differ from the data it was trained on, although the data settings are the same."
        )
    if trainer_state["num_processes"] != num_processes:
        raise ConfigError(
            f"Cannot resume from {checkpoint}: it was written by {trainer_state['num_processes']} "
            f"process(es) and this run has {num_processes}; each process has its own share of "
            "the data and its own RNG state, so resume with the same number of processes."
        )


def _shown(values: dict[str, Any], name: str) -> str:
    return repr(values[name]) if name in values else "not set"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def data_fingerprint(split: SequentialSplit) -> str:
    """A hash of the catalogue, the training sequences and the evaluation examples: same config, changed files."""
    content = [split.item_ids, split.item_texts, split.user_ids, split.train_sequences]
    for examples in (split.valid, split.test):
        content += [examples.user_indices, examples.histories, examples.targets]
    encoded = json.dumps(content, default=lambda value: value.tolist()).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()
