"""The user tower: causal self-attention over a user's item history (SASRec-style, pre-LayerNorm blocks)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import MultiHeadAttention
from .configuration_llmrec import LlmRecConfig


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention block (as in SASRec), whose training is stable without warm-up."""

    def __init__(self, config: LlmRecConfig) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.attention = MultiHeadAttention(config, config.user_num_heads, config.dropout)
        self.feed_forward_norm = nn.LayerNorm(hidden_size)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(4 * hidden_size, hidden_size),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, states: torch.Tensor, allowed: Optional[torch.Tensor], is_causal: bool = False) -> torch.Tensor:
        normed = self.attention_norm(states)
        attended, _ = self.attention(normed, normed, allowed, is_causal=is_causal)
        states = states + self.dropout(attended)
        return states + self.dropout(self.feed_forward(self.feed_forward_norm(states)))

    def forward_at(self, states: torch.Tensor, read: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        """The block's output (B, 1, hidden) at slot `read` (B,) of each row only: queries from that slot,
        keys and values from all slots; `allowed` (B, 1, 1, L) is that slot's row of the mask (or None)."""
        rows = torch.arange(len(states), device=states.device)
        normed = self.attention_norm(states)
        attended, _ = self.attention(normed[rows, read].unsqueeze(1), normed, allowed)
        states = states[rows, read].unsqueeze(1) + self.dropout(attended)
        return states + self.dropout(self.feed_forward(self.feed_forward_norm(states)))


class UserEncoder(nn.Module):
    """Causal self-attention over the history: the state at slot t is the user after t items.

    Training reads every slot at once (each predicts the next item), so one pass over a whole history
    replaces the prefix expansion that makes RecBole's SASRec slow.

    Leading tokens may be put before the history; every slot may attend to them, so they condition the
    whole sequence. They have no position embedding (they are not events in time) and their output slots
    are dropped, so the states still line up with the history slots. Two kinds exist:

    - a projected free-text user profile (`use_user_profiles`); for a user with a profile and an empty
      history, the last slot is the profile token's state;
    - with `history_summary`, a summary of the history older than the window: the mean of those items'
      representations through a learned projection. Self-attention stays within the most recent
      `max_history_length` items plus one token, so a history of any length costs the window's quadratic
      attention plus one pass over the older items (linear), and the older items still count.
    """

    def __init__(self, config: LlmRecConfig) -> None:
        super().__init__()
        self.max_history_length = config.max_history_length
        self.position_embeddings = nn.Embedding(config.max_history_length, config.hidden_size)
        self.input_norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.user_num_layers))
        self.output_norm = nn.LayerNorm(config.hidden_size)
        self.summary_projection = nn.Linear(config.hidden_size, config.hidden_size) if config.history_summary else None
        self.gradient_checkpointing = False

    def forward(
        self, history_embeddings: torch.Tensor, history_mask: torch.Tensor, leading_embeddings: Optional[torch.Tensor] = None,
        leading_mask: Optional[torch.Tensor] = None, last_only: bool = False,
    ) -> torch.Tensor:
        """(B, L, hidden) states; `leading_embeddings` (B, P, hidden) with `leading_mask` (B, P) are leading tokens.

        `last_only=True` returns just the user now (B, 1, hidden), for serving: the last block then
        computes that one slot (its keys and values still cover every slot), not all L.
        """
        if last_only and len(self.blocks) == 0:  # no block to narrow: read the last slot of the full pass
            return self.forward(history_embeddings, history_mask, leading_embeddings, leading_mask)[:, -1:]
        length = history_embeddings.shape[1]
        # Positions count from the end of a full window, as if every history were padded to max length,
        # so the most recent item has the same position in training and serving.
        positions = torch.arange(length, device=history_embeddings.device) + (self.max_history_length - length)
        states = self.input_norm(history_embeddings + self.position_embeddings(positions))
        leading_only = None
        if leading_embeddings is not None:
            leading_only = leading_mask.any(dim=1) & ~history_mask.any(dim=1)
            states = torch.cat([self.input_norm(leading_embeddings), states], dim=1)
            history_mask = torch.cat([leading_mask, history_mask], dim=1)
        states = self.dropout(states)
        if bool(history_mask.all()):
            allowed, is_causal = None, True  # no padding: the fused kernels' own causal mask suffices
        else:
            total = states.shape[1]
            causal = torch.ones(total, total, dtype=torch.bool, device=states.device).tril()
            allowed, is_causal = (causal & history_mask[:, None, :])[:, None], False  # (B, 1, L, L)
        blocks = list(self.blocks)[:-1] if last_only else self.blocks
        for block in blocks:
            if self.gradient_checkpointing and self.training:
                states = self._gradient_checkpointing_func(block.__call__, states, allowed, is_causal)
            else:
                states = block(states, allowed, is_causal)
        # With no history, the last leading token is the user's last real token: read the user there, not
        # at a padding slot whose own (untrained) residual stream would swamp it.
        last_leading = None if leading_only is None else leading_mask.shape[1] - 1 - leading_mask.flip(1).int().argmax(dim=1)
        if last_only:
            return self.output_norm(self._last_block_at_read_slot(states, history_mask, leading_only, last_leading))
        states = self.output_norm(states)
        if leading_only is None:
            return states
        history_states = states[:, states.shape[1] - length :]
        leading_state = states[torch.arange(len(states), device=states.device), last_leading]
        last = torch.where(leading_only.unsqueeze(-1), leading_state, history_states[:, -1])
        return torch.cat([history_states[:, :-1], last.unsqueeze(1)], dim=1)

    def _last_block_at_read_slot(
        self, states: torch.Tensor, mask: torch.Tensor, leading_only: Optional[torch.Tensor], last_leading: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The last block at the slot the user is read from: the last slot, or the last leading token for a
        row with leading tokens but no history. That slot's causal row is every slot up to it, less padding."""
        total = states.shape[1]
        read = torch.full((len(states),), total - 1, dtype=torch.long, device=states.device)
        if leading_only is not None:
            read = torch.where(leading_only, last_leading, read)
        allowed = (torch.arange(total, device=states.device) <= read[:, None]) & mask
        return self.blocks[-1].forward_at(states, read, None if bool(allowed.all()) else allowed[:, None, None, :])
