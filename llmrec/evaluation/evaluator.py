"""Old home of the batched evaluator; it lives in `llmrec.training.ranking` (early stopping validates with it)."""

from ..training.ranking import ScoreFunction, evaluate_ranking, history_exclude_mask, scores_from_candidates
from .scorers import popularity_scores

__all__ = ["ScoreFunction", "evaluate_ranking", "history_exclude_mask", "popularity_scores", "scores_from_candidates"]
