"""Evaluation: every system (popularity, ItemKNN, retrieval, retrieval + rerank, with profiles) scored by one
full-ranking protocol, and `evaluate_systems`, which finetune, `llmrec evaluate` and the benchmarks share.

The ranking protocol itself (ranks, HR/NDCG/MRR@K, the batched evaluator) is in `llmrec.training.ranking`,
because early stopping measures with it; it is re-exported here. The diversity of the top-k lists (coverage,
intra-list diversity, popularity percentile) is in `llmrec.evaluation.diversity`.
"""

from llmrec.evaluation.baselines import ItemKNN
from llmrec.evaluation.diversity import (
    catalogue_coverage,
    diversity_metrics,
    intra_list_diversity,
    mean_popularity_percentile,
    popularity_percentiles,
)
from llmrec.evaluation.scorers import (
    candidate_systems,
    popularity_scores,
    profile_score_functions,
    rerank_score_function,
    retrieval_score_function,
)
from llmrec.evaluation.systems import Evaluation, evaluate_systems, split_evaluations
from llmrec.training.ranking import (
    ScoreFunction,
    evaluate_ranking,
    history_exclude_mask,
    ranking_metrics,
    scores_from_candidates,
    target_ranks,
    top_items,
)

__all__ = [
    "Evaluation",
    "ItemKNN",
    "ScoreFunction",
    "candidate_systems",
    "catalogue_coverage",
    "diversity_metrics",
    "evaluate_ranking",
    "evaluate_systems",
    "history_exclude_mask",
    "intra_list_diversity",
    "mean_popularity_percentile",
    "popularity_percentiles",
    "popularity_scores",
    "profile_score_functions",
    "ranking_metrics",
    "rerank_score_function",
    "retrieval_score_function",
    "scores_from_candidates",
    "split_evaluations",
    "target_ranks",
    "top_items",
]
