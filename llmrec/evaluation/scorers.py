"""Score functions: a system (popularity, FAISS retrieval, retrieval + rerank, with or without a user's profile)
as histories -> (B, num_items + 1) scores over the whole catalogue, ready for `evaluate_ranking`.

The retrieval and rerank adapters live in `llmrec.training.ranking`, since early stopping validates with them;
they are re-exported here so that every scorer is found in one place.
"""

from __future__ import annotations

import numpy as np
import torch

from ..modeling import split_histories
from ..retrieval import CandidatePipeline
from ..training.ranking import ScoreFunction, rerank_score_function, retrieval_score_function, scores_from_candidates

__all__ = [
    "candidate_systems",
    "popularity_scores",
    "profile_score_functions",
    "rerank_score_function",
    "retrieval_score_function",
]


def popularity_scores(popularity: np.ndarray) -> ScoreFunction:
    """Score function for the most-popular baseline, the floor every model should beat."""
    popularity_row = torch.as_tensor(np.asarray(popularity, dtype=np.float32)).clone()
    if popularity_row.ndim != 1 or popularity_row.shape[0] < 2:
        raise ValueError("popularity must be a 1-D array of length num_items + 1 (entry 0 = padding).")
    popularity_row[0] = float("-inf")

    def score_fn(histories: list[list[int]]) -> torch.Tensor:
        return popularity_row.unsqueeze(0).expand(len(histories), -1)

    return score_fn


def candidate_systems(pipeline: CandidatePipeline, popularity: np.ndarray, num_items: int) -> dict[str, ScoreFunction]:
    """The three systems eval_results.json reports, in its order: popularity, retrieval, retrieval + rerank."""
    return {
        "popularity": popularity_scores(popularity),
        "retrieval": retrieval_score_function(pipeline, num_items),
        "rerank": rerank_score_function(pipeline, num_items),
    }


def profile_score_functions(
    pipeline: CandidatePipeline, profile_embeddings: torch.Tensor, has_profile: torch.Tensor, num_items: int
) -> dict[str, ScoreFunction]:
    """Retrieval and rerank score functions, as `retrieval_score_function` / `rerank_score_function`, for users
    who also have a profile: row i of `profile_embeddings` belongs to the i-th example evaluated.

    Each function takes the positions of the histories it scores (`takes_positions`), so it pairs every
    history with its own profile in any number of evaluation passes.
    """
    if len(profile_embeddings) != len(has_profile):
        raise ValueError(f"{len(profile_embeddings)} profile embeddings but {len(has_profile)} has_profile flags.")

    def make(stage: str) -> ScoreFunction:
        @torch.inference_mode()
        def score(histories: list[list[int]], positions: np.ndarray) -> torch.Tensor:
            rows = torch.as_tensor(np.asarray(positions), dtype=torch.long)
            if len(rows) != len(histories):
                raise ValueError(f"{len(histories)} histories but {len(rows)} positions; pass one position per history.")
            if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(profile_embeddings)):
                raise ValueError(f"Positions must lie in [0, {len(profile_embeddings)}): one profile per evaluated example.")
            device = pipeline.device
            window, older = split_histories(histories, pipeline.model.config.max_history_length, device)
            users = pipeline.model.encode_users(window, pipeline.item_embeddings, profile_embeddings[rows].to(device),
                                                has_profile[rows].to(device), older)[:, -1]
            candidate_scores, candidates = pipeline.retrieve(histories, user_embeddings=users)
            if stage == "rerank":
                candidate_scores, _ = pipeline.rerank(histories, candidates, user_embeddings=users)
                candidate_scores = candidate_scores.float().cpu()
            return scores_from_candidates(torch.as_tensor(candidates), torch.as_tensor(candidate_scores), num_items)

        score.takes_positions = True
        return score

    return {"retrieval": make("retrieval"), "rerank": make("rerank")}
