"""Configuration of an llmrec model (saved as `config.json` beside `model.safetensors`)."""

from __future__ import annotations

from typing import Any, Optional

from transformers import PretrainedConfig

# Bumped when the on-disk layout of a saved model changes incompatibly.
MODEL_FORMAT_VERSION = 1
ENCODER_WEIGHT_KINDS = ("full", "adapter")


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
        use_text_embeddings: bool = True,
        use_user_profiles: bool = False,
        exclude_unseen_items_from_loss: bool = True,
        similarity_temperature: float = 0.05,
        num_candidates: int = 100,
        encoder_weights: str = "full",
        format_version: int = MODEL_FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}.")
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}.")
        for name, heads in (("user_num_heads", user_num_heads), ("rerank_num_heads", rerank_num_heads)):
            if hidden_size % heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by {name} ({heads}).")
        if encoder_weights not in ENCODER_WEIGHT_KINDS:
            raise ValueError(f"encoder_weights must be one of {ENCODER_WEIGHT_KINDS}, got {encoder_weights!r}.")
        if not (use_text_embeddings or use_id_embeddings):
            raise ValueError("use_text_embeddings and use_id_embeddings are both False; items need a representation.")
        if similarity_temperature <= 0:
            raise ValueError(f"similarity_temperature must be positive, got {similarity_temperature}.")
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
        self.use_text_embeddings = use_text_embeddings
        self.use_user_profiles = use_user_profiles
        self.exclude_unseen_items_from_loss = exclude_unseen_items_from_loss
        self.similarity_temperature = similarity_temperature
        self.num_candidates = num_candidates
        self.encoder_weights = encoder_weights
        self.format_version = format_version
        super().__init__(**kwargs)
