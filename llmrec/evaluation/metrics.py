"""Old home of the ranking metrics; they live in `llmrec.training.ranking` (early stopping validates with them)."""

from ..training.ranking import ranking_metrics, target_ranks

__all__ = ["ranking_metrics", "target_ranks"]
