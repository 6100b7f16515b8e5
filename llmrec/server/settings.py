"""`ServeSettings`: every limit and knob of the HTTP server, with its help text, in one dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from ..errors import ConfigError

TOKEN_ENVIRONMENT_VARIABLE = "LLMREC_SERVE_TOKEN"


@dataclass(frozen=True)
class ServeSettings:
    """What `create_app` and `llmrec serve` obey. The limits turn requests that would cost unbounded memory
    or time into a 413 before any work is done; the defaults fit interactive recommendation."""

    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body in bytes; larger ones get 413."})
    max_history_items: int = field(default=2_000, metadata={"help": "Most item ids in one history (413 above)."})
    max_candidates: int = field(default=2_000, metadata={"help": "Most candidates in one /rerank list (413 above)."})
    max_id_list_items: int = field(default=10_000, metadata={"help": "Most ids in one exclude or filter list (413 above)."})
    max_batch_rows: int = field(default=1_024, metadata={"help": "Most users in one /recommend/batch request (413 above)."})
    max_new_items: int = field(default=1_000, metadata={"help": "Most items one POST /items may add (413 above)."})
    max_item_text_chars: int = field(default=10_000, metadata={"help": "Longest item or profile text in characters (413 above)."})
    max_in_flight: int = field(
        default=256, metadata={"help": "Requests admitted at once; beyond it the server answers 503 with Retry-After "
                               "instead of queueing without bound."},
    )
    retry_after_seconds: int = field(default=1, metadata={"help": "Retry-After a shed request is told to wait."})
    batch_wait_ms: float = field(
        default=2.0, metadata={"help": "How long /recommend waits to gather concurrent requests into one "
                               "recommend_batch call (0 scores each request alone)."},
    )
    max_batch_size: int = field(default=64, metadata={"help": "Most /recommend requests scored in one batch."})
    token: Optional[str] = field(
        default=None, metadata={"help": f"Bearer token for /items and /admin/* (default: ${TOKEN_ENVIRONMENT_VARIABLE}); "
                                "None leaves them open."},
    )
    token_for_reads: bool = field(default=False, metadata={"help": "Require the token for reads (/recommend, ...) too."})
    allow_writes: bool = field(
        default=True, metadata={"help": "Serve /items and /admin/*; `llmrec serve --workers N>1` turns them off because "
                                "each worker process holds its own model, so a write would reach one of them."},
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name in ("token", "token_for_reads", "allow_writes"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and spec.name != "batch_wait_ms"):
                raise ConfigError(f"ServeSettings.{spec.name} must be a positive number, got {value!r} ({spec.metadata['help']})")
        if self.token is not None and not self.token.strip():
            raise ConfigError("The serving token is empty; pass a non-empty --token (or unset LLMREC_SERVE_TOKEN).")
        if self.token_for_reads and self.token is None:
            raise ConfigError(f"--token-for-reads needs a token: pass --token or set {TOKEN_ENVIRONMENT_VARIABLE}.")

    @classmethod
    def from_environment(cls, **overrides: Any) -> "ServeSettings":
        """Settings whose token defaults to $LLMREC_SERVE_TOKEN (an explicit `token=` wins)."""
        if overrides.get("token") is None:
            overrides["token"] = os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None
        return cls(**overrides)

    def updated(self, **changes: Any) -> "ServeSettings":
        return replace(self, **changes)
