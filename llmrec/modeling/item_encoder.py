"""The item text tower: a Hugging Face encoder (BERT-like) whose token states are pooled into one vector per text."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from .configuration_llmrec import LlmRecConfig


class ItemTextEncoder(nn.Module):
    """A Hugging Face encoder plus pooling: item text -> one vector."""

    def __init__(self, config: LlmRecConfig) -> None:
        super().__init__()
        if not config.encoder_config:
            raise ValueError("LlmRecConfig.encoder_config is empty; build the model with LlmRecModel.from_encoder(...).")
        encoder_config = AutoConfig.for_model(**config.encoder_config)
        self.backbone = AutoModel.from_config(encoder_config, attn_implementation="sdpa")
        self.pooling = config.pooling

    @property
    def output_size(self) -> int:
        return self.backbone.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Pooled in fp32 even when the encoder runs in bf16: a sum over tokens is where bf16 loses digits.
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
