"""Configuration of an llmrec model (saved as `config.json` beside `model.safetensors`)."""

from __future__ import annotations

from numbers import Integral
from typing import Any, Optional

from transformers import PretrainedConfig

from ..config.model import ModelSettings, check_stored_types
from ..errors import ConfigError
from ..limits import MAX_NUM_CANDIDATES
from ..utils.integrity import CHECKSUMS_KEY

# Bumped when the on-disk layout of a saved model changes incompatibly.
MODEL_FORMAT_VERSION = 1
ENCODER_WEIGHT_KINDS = ("full", "adapter")

# Settings a trained model adds to `ModelSettings`: name -> (smallest, largest or None).
_INTEGER_RANGES = {"num_items": (0, None), "num_candidates": (1, MAX_NUM_CANDIDATES), "format_version": (0, None)}
# Every stored `model:` setting with its default: the keyword arguments of LlmRecConfig besides its own.
_SETTING_DEFAULTS = ModelSettings().stored_settings()


def _is_integer(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _validate(settings: dict[str, Any], **trained: Any) -> None:
    """Type and range of every value, so a hand-edited or corrupt config.json fails here, naming the field."""
    check_stored_types(settings)
    ModelSettings(**settings).validate(prefix="")
    for name, (low, high) in _INTEGER_RANGES.items():
        value = trained[name]
        if not _is_integer(value) or value < low or (high is not None and value > high):
            allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
            raise ConfigError(f"{name} must be {allowed}, got {value!r}.")
    if not isinstance(trained["exclude_history"], bool):
        raise ConfigError(f"exclude_history must be true or false, got {trained['exclude_history']!r}.")
    if trained["encoder_weights"] not in ENCODER_WEIGHT_KINDS:
        raise ConfigError(f"encoder_weights must be one of {ENCODER_WEIGHT_KINDS}, got {trained['encoder_weights']!r}.")
    if trained["encoder_name_or_path"] is not None and not isinstance(trained["encoder_name_or_path"], str):
        raise ConfigError(f"encoder_name_or_path must be a string, got {trained['encoder_name_or_path']!r}.")
    encoder_config = trained["encoder_config"]
    if encoder_config is not None and not isinstance(encoder_config, dict):
        raise ConfigError(f"encoder_config must be a mapping (the encoder's own config), got {type(encoder_config).__name__}.")
    positions = (encoder_config or {}).get("max_position_embeddings")
    if _is_integer(positions) and settings["max_text_length"] > positions:
        raise ConfigError(
            f"max_text_length ({settings['max_text_length']}) is longer than the encoder reads "
            f"(max_position_embeddings {positions}); use at most {positions}."
        )


class LlmRecConfig(PretrainedConfig):
    """Settings of the item text encoder, the user encoder and the cross-attention reranking head.

    `encoder_config` holds the HF encoder's own config as a dict, so a saved model rebuilds its encoder
    from `config.json` alone. `encoder_name_or_path` records where the encoder's weights came from; it is
    only read again when `encoder_weights` is "adapter", i.e. the folder holds a PEFT adapter for that base
    model instead of full encoder weights.

    `use_text_embeddings` / `use_id_embeddings` pick the item representation: hybrid (both, the default),
    text-only or ID-only. `use_user_profiles` adds a projection for free-text user profiles. Both new flags
    default to the layout of models saved before they existed, so those folders load unchanged.

    Histories longer than `max_history_length` keep their most recent items; with `history_summary` the
    older ones are also read, pooled into one learned summary token (see `UserEncoder`).

    `num_candidates` and `exclude_history` are the retrieval protocol the model was trained and evaluated
    with (`retrieval.*`); serving reads them from here, so config.yaml stays a record of the run.
    """

    model_type = "llmrec"

    def __init__(
        self,
        encoder_name_or_path: Optional[str] = None,
        encoder_config: Optional[dict[str, Any]] = None,
        num_items: int = 0,
        num_candidates: int = 100,
        exclude_history: bool = True,
        encoder_weights: str = "full",
        format_version: int = MODEL_FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        """`kwargs` take the `model:` settings of `ModelSettings` (pooling, hidden_size, ...), with its defaults."""
        kwargs.pop(CHECKSUMS_KEY, None)  # recorded in config.json for the folder's files, not a model setting
        settings = {name: kwargs.pop(name, default) for name, default in _SETTING_DEFAULTS.items()}
        _validate(
            settings, encoder_name_or_path=encoder_name_or_path, encoder_config=encoder_config, num_items=num_items,
            num_candidates=num_candidates, exclude_history=exclude_history, encoder_weights=encoder_weights,
            format_version=format_version,
        )
        for name, value in settings.items():
            setattr(self, name, value)
        self.encoder_name_or_path = encoder_name_or_path
        self.encoder_config = encoder_config or {}
        self.num_items = num_items
        self.num_candidates = num_candidates
        self.exclude_history = exclude_history
        self.encoder_weights = encoder_weights
        self.format_version = format_version
        super().__init__(**kwargs)
