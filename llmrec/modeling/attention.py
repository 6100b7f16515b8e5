"""Multi-head attention shared by the user encoder and the reranking head.

Fused `scaled_dot_product_attention` by default; `plain_attention` is the written-out reference that also
returns the attention weights (for `explain`, `output_attentions=True` and the benchmarks).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_llmrec import LlmRecConfig


def _attention_mask_without_empty_rows(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A query whose keys are all masked makes softmax return NaN, and 0 x NaN leaks through later layers.

    Such rows are opened to every key and flagged, so the caller can zero their output.
    """
    empty_rows = ~allowed.any(dim=-1, keepdim=True)
    return allowed | empty_rows, empty_rows


def plain_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: Optional[torch.Tensor],
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T / sqrt(d)) V written out, returning the weights too (for `explain` and as the reference kernel)."""
    logits = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if is_causal:
        causal = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    weights = logits.softmax(dim=-1)
    return F.dropout(weights, dropout_p) @ value if dropout_p > 0 else weights @ value, weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`, with weights on request.

    The mask is dropped when it masks nothing, and a purely causal mask becomes `is_causal=True`, so
    PyTorch may pick its fused (flash / memory-efficient) kernels; an explicit boolean mask rules flash out.
    `config._attn_implementation == "eager"` selects `plain_attention` instead (the reference the
    benchmarks compare against); `output_attentions=True` always uses it, since fused kernels return no weights.
    """

    def __init__(self, config: LlmRecConfig, num_heads: int, dropout: float) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, allowed: Optional[torch.Tensor], output_attentions: bool = False,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`allowed` is a boolean mask broadcastable to (B, heads, Q, K), True = may attend, or None (all)."""
        return self.attend(self.query(queries), self.key(keys), self.value(keys), allowed, output_attentions, is_causal)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        allowed: Optional[torch.Tensor],
        output_attentions: bool = False,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention over already projected (B, L, hidden) inputs, e.g. the reranker's cached item projections."""
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        empty_rows = None
        if allowed is not None:
            allowed, empty_rows = _attention_mask_without_empty_rows(allowed)
        if output_attentions or self.config._attn_implementation == "eager":
            dropout_p = self.dropout if self.training else 0.0
            attended, weights = plain_attention(query, key, value, allowed, is_causal, dropout_p)
            if empty_rows is not None:
                weights = weights.masked_fill(empty_rows, 0.0)
            weights = weights if output_attentions else None
        else:
            weights = None
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=allowed, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
            )
        if empty_rows is not None:
            attended = attended.masked_fill(empty_rows, 0.0)
        batch, _, length, _ = attended.shape
        attended = attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.output(attended), weights
