"""Configuration of an llmrec model (saved as `config.json` beside `model.safetensors`)."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Optional

from transformers import PretrainedConfig

from ..errors import ConfigError
from ..limits import MAX_NUM_CANDIDATES
from ..utils.integrity import CHECKSUMS_KEY

# Bumped when the on-disk layout of a saved model changes incompatibly.
MODEL_FORMAT_VERSION = 1
ENCODER_WEIGHT_KINDS = ("full", "adapter")

_INTEGER_RANGES = {  # name: (smallest, largest or None)
    "num_items": (0, None), "hidden_size": (1, None), "max_history_length": (1, None), "user_num_layers": (0, None),
    "user_num_heads": (1, None), "rerank_num_heads": (1, None), "num_candidates": (1, MAX_NUM_CANDIDATES),
    "format_version": (0, None), "max_text_length": (1, None),
}
_FRACTIONS = {"dropout": (0.0, 1.0, False), "id_dropout": (0.0, 1.0, True)}  # name: (low, high, high allowed)
_FLAGS = ("history_summary", "use_id_embeddings", "use_text_embeddings", "use_user_profiles", "exclude_unseen_items_from_loss")


def _is_integer(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _validate(**values: Any) -> None:
    """Type and range of every setting, so a hand-edited or corrupt config.json fails here, naming the field.

    Without this a string flag reads as true, and an impossible size fails deep inside torch or BERT.
    """
    for name, (low, high) in _INTEGER_RANGES.items():
        value = values[name]
        if not _is_integer(value) or value < low or (high is not None and value > high):
            allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
            raise ConfigError(f"{name} must be {allowed}, got {value!r}.")
    for name, (low, high, high_allowed) in _FRACTIONS.items():
        value = values[name]
        if not isinstance(value, Real) or isinstance(value, bool) or not (low <= value <= high) or (value == high and not high_allowed):
            raise ConfigError(f"{name} must be a number in [{low}, {high}{']' if high_allowed else ')'}, got {value!r}.")
    for name in _FLAGS:
        if not isinstance(values[name], bool):
            raise ConfigError(f"{name} must be true or false, got {values[name]!r}.")
    ratio = values["id_residual_max_ratio"]
    if not isinstance(ratio, Real) or isinstance(ratio, bool) or not (math.isfinite(ratio) and ratio >= 0):
        raise ConfigError(f"id_residual_max_ratio must be a number >= 0 (0 = unbounded), got {ratio!r}.")
    temperature = values["similarity_temperature"]
    if not isinstance(temperature, Real) or isinstance(temperature, bool) or not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"similarity_temperature must be a positive number, got {temperature!r}.")
    if values["pooling"] not in ("mean", "cls"):
        raise ConfigError(f"pooling must be 'mean' or 'cls', got {values['pooling']!r}.")
    if values["encoder_weights"] not in ENCODER_WEIGHT_KINDS:
        raise ConfigError(f"encoder_weights must be one of {ENCODER_WEIGHT_KINDS}, got {values['encoder_weights']!r}.")
    if values["encoder_name_or_path"] is not None and not isinstance(values["encoder_name_or_path"], str):
        raise ConfigError(f"encoder_name_or_path must be a string, got {values['encoder_name_or_path']!r}.")
    encoder_config = values["encoder_config"]
    if encoder_config is not None and not isinstance(encoder_config, dict):
        raise ConfigError(f"encoder_config must be a mapping (the encoder's own config), got {type(encoder_config).__name__}.")
    positions = (encoder_config or {}).get("max_position_embeddings")
    if _is_integer(positions) and values["max_text_length"] > positions:
        raise ConfigError(
            f"max_text_length ({values['max_text_length']}) is longer than the encoder reads "
            f"(max_position_embeddings {positions}); use at most {positions}."
        )
    for name in ("user_num_heads", "rerank_num_heads"):
        if values["hidden_size"] % values[name]:
            raise ConfigError(f"hidden_size ({values['hidden_size']}) must be divisible by {name} ({values[name]}).")
    if not (values["use_text_embeddings"] or values["use_id_embeddings"]):
        raise ConfigError("use_text_embeddings and use_id_embeddings are both False; items need a representation.")


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
    """

    model_type = "llmrec"

    def __init__(
        self,
        encoder_name_or_path: Optional[str] = None,
        encoder_config: Optional[dict[str, Any]] = None,
        pooling: str = "mean",
        max_text_length: int = 64,
        num_items: int = 0,
        hidden_size: int = 64,
        max_history_length: int = 200,
        history_summary: bool = False,
        user_num_layers: int = 2,
        user_num_heads: int = 2,
        rerank_num_heads: int = 2,
        dropout: float = 0.3,
        use_id_embeddings: bool = True,
        id_dropout: float = 0.1,
        id_residual_max_ratio: float = 0.0,
        use_text_embeddings: bool = True,
        use_user_profiles: bool = False,
        exclude_unseen_items_from_loss: bool = True,
        similarity_temperature: float = 0.05,
        num_candidates: int = 100,
        encoder_weights: str = "full",
        format_version: int = MODEL_FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        kwargs.pop(CHECKSUMS_KEY, None)  # recorded in config.json for the folder's files, not a model setting
        _validate(
            encoder_name_or_path=encoder_name_or_path, encoder_config=encoder_config, pooling=pooling,
            max_text_length=max_text_length, num_items=num_items, hidden_size=hidden_size,
            max_history_length=max_history_length, history_summary=history_summary, user_num_layers=user_num_layers,
            user_num_heads=user_num_heads, rerank_num_heads=rerank_num_heads, dropout=dropout,
            use_id_embeddings=use_id_embeddings, id_dropout=id_dropout,
            id_residual_max_ratio=id_residual_max_ratio, use_text_embeddings=use_text_embeddings,
            use_user_profiles=use_user_profiles, exclude_unseen_items_from_loss=exclude_unseen_items_from_loss,
            similarity_temperature=similarity_temperature, num_candidates=num_candidates,
            encoder_weights=encoder_weights, format_version=format_version,
        )
        self.encoder_name_or_path = encoder_name_or_path
        self.encoder_config = encoder_config or {}
        self.pooling = pooling
        self.max_text_length = max_text_length
        self.num_items = num_items
        self.hidden_size = hidden_size
        self.max_history_length = max_history_length
        self.history_summary = history_summary
        self.user_num_layers = user_num_layers
        self.user_num_heads = user_num_heads
        self.rerank_num_heads = rerank_num_heads
        self.dropout = dropout
        self.use_id_embeddings = use_id_embeddings
        self.id_dropout = id_dropout
        self.id_residual_max_ratio = id_residual_max_ratio
        self.use_text_embeddings = use_text_embeddings
        self.use_user_profiles = use_user_profiles
        self.exclude_unseen_items_from_loss = exclude_unseen_items_from_loss
        self.similarity_temperature = similarity_temperature
        self.num_candidates = num_candidates
        self.encoder_weights = encoder_weights
        self.format_version = format_version
        super().__init__(**kwargs)
