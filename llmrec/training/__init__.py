"""Two-stage training (towers, then reranking head) under Accelerate."""

from typing import Any

from .trainer import LlmRecTrainer

__all__ = ["LlmRecTrainer", "run_finetune"]


def __getattr__(name: str) -> Any:
    """`run_finetune` (train, evaluate, save) lives in `llmrec.finetune`, above evaluation; this is its old path."""
    if name == "run_finetune":
        from ..finetune import run_finetune

        return run_finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
