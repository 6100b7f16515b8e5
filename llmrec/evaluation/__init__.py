"""Full-ranking evaluation: ranks, HR/NDCG/MRR@K and baseline scorers."""

from llmrec.evaluation.baselines import ItemKNN
from llmrec.evaluation.evaluator import (
    ScoreFunction,
    evaluate_ranking,
    history_exclude_mask,
    popularity_scores,
    scores_from_candidates,
)
from llmrec.evaluation.metrics import ranking_metrics, target_ranks

__all__ = [
    "ItemKNN",
    "ScoreFunction",
    "evaluate_ranking",
    "history_exclude_mask",
    "popularity_scores",
    "ranking_metrics",
    "scores_from_candidates",
    "target_ranks",
]
