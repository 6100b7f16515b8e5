"""Two-stage training (towers, then reranking head) under Accelerate."""

from .pipeline import run_finetune
from .trainer import LlmRecTrainer

__all__ = ["LlmRecTrainer", "run_finetune"]
