"""Checks a fine-tuning run makes before it loads any data, so a doomed run fails in seconds, not after training."""

from __future__ import annotations

import difflib
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig

from ..config import ExperimentConfig
from ..errors import ConfigError
from .continuation import check_init_folder
from .tracking import check_tracker

logger = logging.getLogger(__name__)

# PEFT's own shorthand for "every linear layer but the output one": nothing to look up.
PEFT_ALL_LINEAR = "all-linear"


def preflight(config: ExperimentConfig, encoder_path: str) -> None:
    """Refuse a config that could only fail late: impossible values, an unwritable output_dir, an encoder
    that lacks the LoRA target modules or is too short for model.max_text_length, a training.init_from folder
    that is not an llmrec model or was built with other model settings, a tracker that is not installed."""
    config.validate()  # a config built in Python has not been through load_config
    check_output_dir_writable(Path(config.output_dir))
    check_tracker(config.training.report_to)
    encoder_config = _encoder_config(encoder_path)
    check_text_length(config, encoder_config)
    if config.lora is not None:
        check_lora_targets(config.lora.target_modules, encoder_config, encoder_path)
    if config.training.init_from is not None:
        check_init_folder(config, encoder_path)


def check_output_dir_writable(output_dir: Path) -> None:
    """The run writes checkpoints into output_dir and stages its final save beside it: both must be writable.

    Probed by creating and removing a file, which also catches read-only mounts and ACLs that
    permission bits alone would not show.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder; choose another output_dir.")
    existing = output_dir.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir {output_dir} cannot be created: {existing} is a file, not a folder.")
    folders = [existing, output_dir] if output_dir.is_dir() else [existing]
    for folder in folders:
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".llmrec-write-probe-"):
                pass
        except OSError as error:
            raise ConfigError(
                f"output_dir {output_dir} is not writable: cannot create a file in {folder} "
                f"({error.strerror or error}); choose a folder you can write to."
            ) from None


def _encoder_config(encoder_path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(encoder_path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.encoder {encoder_path!r} has no readable config.json ({error}).") from None


def check_text_length(config: ExperimentConfig, encoder_config: PretrainedConfig) -> None:
    """Position embeddings bound the tokens an encoder reads; more would fail inside the first forward pass."""
    limit = getattr(encoder_config, "max_position_embeddings", None)
    if isinstance(limit, int) and config.model.max_text_length > limit:
        raise ConfigError(
            f"model.max_text_length {config.model.max_text_length} exceeds what the encoder reads "
            f"(max_position_embeddings {limit}); set model.max_text_length <= {limit}."
        )


def check_lora_targets(target_modules: list[str], encoder_config: PretrainedConfig, encoder_path: str) -> None:
    """Every lora.target_modules entry must name modules of the encoder, as PEFT matches them (a full name
    or a dotted suffix); PEFT would otherwise fail only once the model is built, or skip a misspelt one."""
    if PEFT_ALL_LINEAR in target_modules:
        return
    # On the meta device: module names without allocating or initialising any weights.
    with torch.device("meta"):
        encoder = AutoModel.from_config(encoder_config)
    names = [name for name, _ in encoder.named_modules() if name]
    missing = [target for target in target_modules if not any(name == target or name.endswith(f".{target}") for name in names)]
    if not missing:
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in encoder.named_modules() if isinstance(module, torch.nn.Linear)})
    hints = [f"{target!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(target, linear, n=1))
             else repr(target) for target in missing]
    raise ConfigError(
        f"lora.target_modules {', '.join(hints)} name no module of the encoder {encoder_path}; its linear layers are "
        f"{', '.join(linear)} (or use {PEFT_ALL_LINEAR!r})."
    )
