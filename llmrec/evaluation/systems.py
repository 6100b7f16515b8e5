"""`evaluate_systems`: every system on every evaluated split, the one evaluation behind finetune's
eval_results.json, `llmrec evaluate` and the benchmarks: ranking metrics and, from the same scores, the
diversity of the top-k lists (`llmrec.evaluation.diversity`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import torch

from ..data import EvaluationExamples, SequentialSplit
from ..retrieval import CandidatePipeline
from ..training.ranking import ScoreFunction, evaluate_ranking
from .diversity import diversity_metrics
from .scorers import candidate_systems, profile_score_functions

logger = logging.getLogger(__name__)

Evaluation = tuple[str, EvaluationExamples, Mapping[str, ScoreFunction]]
"""(split name, its examples, {system name: score function}): one block of eval_results.json."""


def evaluate_systems(
    evaluations: Sequence[Evaluation],
    num_items: int,
    ks: Sequence[int] = (10, 20),
    batch_size: int = 256,
    accelerator: Optional[object] = None,
    item_text_embeddings: Optional[torch.Tensor] = None,
    item_popularity: Optional[np.ndarray] = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {system: metrics}} by the full-ranking protocol (`evaluate_ranking`), in the order given.

    Beside HR/NDCG/MRR@k each system gets coverage@k of its top-k lists, ild@k when `item_text_embeddings`
    (the model's cached encoder outputs, (num_items + 1, dim)) are given and popularity_percentile@k when
    `item_popularity` (training counts, entry 0 = padding) is; the lists come from the ranking pass itself.
    """
    results: dict[str, dict[str, dict[str, float]]] = {}
    for split_name, examples, systems in evaluations:
        results[split_name] = {}
        for name, score_fn in systems.items():
            top_items = torch.zeros((len(examples.histories), max(ks)), dtype=torch.long)
            metrics = evaluate_ranking(
                score_fn, examples.histories, examples.targets, num_items, ks=ks, batch_size=batch_size,
                desc=f"{split_name} {name}", accelerator=accelerator, top_items_out=top_items,
            )
            num_users = metrics.pop("num_users")
            metrics.update(diversity_metrics(top_items, num_items, ks, item_text_embeddings, item_popularity))
            results[split_name][name] = {**metrics, "num_users": num_users}
        for name, metrics in results[split_name].items():
            logger.info("%s %-10s %s", split_name, name, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return results


def split_evaluations(
    split: SequentialSplit,
    pipeline: CandidatePipeline,
    popularity: np.ndarray,
    profile_embeddings: Optional[torch.Tensor] = None,
    has_profile: Optional[torch.Tensor] = None,
) -> list[Evaluation]:
    """What a finetune run evaluates: valid and test, and for a split with cold examples `cold_test`.

    With user profiles the cold examples are also evaluated with each user's profile added
    (`cold_test_with_profile`) and, for `cold_users`, the cold users that have a profile with no history
    (`cold_test_profile_only`).
    """
    systems = candidate_systems(pipeline, popularity, split.num_items)
    evaluations: list[Evaluation] = [("valid", split.valid, systems), ("test", split.test, systems)]
    if len(split.cold_test):  # cold_items / cold_users splits: the held-out items' or users' examples
        evaluations.append(("cold_test", split.cold_test, systems))
        if profile_embeddings is not None and has_profile is not None:
            evaluations += _profile_evaluations(split, pipeline, systems["popularity"], profile_embeddings, has_profile)
    return evaluations


def _profile_evaluations(
    split: SequentialSplit, pipeline: CandidatePipeline, popularity: ScoreFunction, embeddings: torch.Tensor,
    has_profile: torch.Tensor,
) -> list[Evaluation]:
    """The cold examples with each user's profile added, and (cold_users) the profile alone."""
    cold = split.cold_test
    rows = torch.as_tensor(cold.user_indices, dtype=torch.long)
    evaluations: list[Evaluation] = [("cold_test_with_profile", cold, {
        "popularity": popularity, **profile_score_functions(pipeline, embeddings[rows], has_profile[rows], split.num_items)})]
    if not split.cold_user_indices:
        return evaluations
    keep = [position for position, user in enumerate(cold.user_indices) if has_profile[user]]
    if not keep:
        logger.warning("No cold user has a profile; cold_test_profile_only is not evaluated.")
        return evaluations
    profile_only = EvaluationExamples([cold.user_indices[position] for position in keep], [[] for _ in keep],
                                      [cold.targets[position] for position in keep])
    rows = torch.as_tensor(profile_only.user_indices, dtype=torch.long)
    evaluations.append(("cold_test_profile_only", profile_only, {
        "popularity": popularity, **profile_score_functions(pipeline, embeddings[rows], has_profile[rows], split.num_items)}))
    return evaluations
