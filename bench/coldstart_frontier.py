"""What a trained hybrid can trade between new (cold) and warm items without retraining (bench/coldstart.py).

Two ways to lift new items, both applied to one trained model, and the figures that say whether the text
path gets them as far as the head:

- a score offset for every item without a trained ID row, added to its cosine before ranking (a uniform
  "new-item prior"); `calibrated_offset` also fits one on the warm validation users, by maximum likelihood
  with a random share of warm items scored as if new (text only), the way a user could choose it;
- `recommend_batch(..., new_items=n)`: up to n of the 10 slots held for the best new items;
- cold candidate recall: the share of cold targets among the FAISS candidates the head reranks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llmrec import Recommender
from llmrec.evaluation import evaluate_ranking, history_exclude_mask

OFFSETS = (0.01, 0.02, 0.04)  # cosine units (scores are cosine / temperature)
RESERVED_SLOTS = (1, 2)


def frontier(recommender: Recommender, split) -> dict:
    """Cold and warm NDCG@10 / HR@10 of the model under each offset and each count of reserved slots."""
    pipeline = recommender.pipeline
    cold_mask = _cold_mask(split)
    cold, warm = split.cold_test, split.test
    rows: dict = {}
    for offset in OFFSETS:
        score = _offset_scores(pipeline, cold_mask, offset)
        rows[f"retrieval, new-item offset {offset}"] = {
            "cold": _metrics(score, cold, split.num_items), "warm": _metrics(score, warm, split.num_items)}
    for slots in RESERVED_SLOTS:
        rows[f"+ rerank, new_items={slots}"] = {
            "cold": _reserved_metrics(recommender, cold, slots), "warm": _reserved_metrics(recommender, warm, slots)}
    candidates = pipeline.num_candidates
    recall = evaluate_ranking(_offset_scores(pipeline, cold_mask, 0.0), cold.histories, cold.targets, split.num_items,
                              ks=[candidates])[f"hr@{candidates}"]
    return {"rows": rows, f"cold_candidate_recall@{candidates}": recall, "calibrated_offset": calibrated_offset(recommender, split)}


def _cold_mask(split) -> torch.Tensor:
    mask = torch.zeros(split.num_items + 1, dtype=torch.bool)
    mask[torch.as_tensor(split.cold_item_indices)] = True
    return mask


def _metrics(score_function, examples, num_items: int) -> dict:
    metrics = evaluate_ranking(score_function, examples.histories, examples.targets, num_items, ks=[10])
    return {name: metrics[name] for name in ("ndcg@10", "hr@10")}


def _offset_scores(pipeline, cold_mask: torch.Tensor, offset: float):
    """Dense retrieval scores over the whole catalogue, with `offset` added to every cold item's cosine."""
    items = F.normalize(pipeline.item_embeddings, dim=-1)
    temperature = pipeline.model.config.similarity_temperature
    bonus = cold_mask.to(items.dtype) * (offset / temperature)

    def score(histories):
        users = F.normalize(pipeline.user_embeddings(histories), dim=-1)
        scores = users @ items.T / temperature + bonus
        scores[:, 0] = float("-inf")
        return scores

    return score


def _reserved_metrics(recommender: Recommender, examples, slots: int) -> dict:
    """NDCG@10 / HR@10 of `recommend_batch(k=10, new_items=slots)`, the answer a caller gets, head included."""
    item_ids = recommender.item_ids
    histories = [[item_ids[index - 1] for index in history] for history in examples.histories]
    gains = []
    for start in range(0, len(histories), 256):
        answers = recommender.recommend_batch(histories[start:start + 256], k=10, new_items=slots)
        for answer, target in zip(answers, examples.targets[start:start + 256]):
            ranked = [item[0] for item in answer]
            target_id = item_ids[target - 1]
            gains.append(1.0 / np.log2(ranked.index(target_id) + 2) if target_id in ranked else 0.0)
    gains = np.asarray(gains)
    return {"ndcg@10": float(gains.mean()), "hr@10": float((gains > 0).mean())}


@torch.inference_mode()
def calibrated_offset(
    recommender: Recommender, split, share: float = 0.15, repeats: int = 3, seed: int = 0, max_users: int = 4000
) -> dict:
    """The new-item offset that maximises the warm validation targets' likelihood when a random `share` of the
    warm items is scored text only (as if new): the offset a user could pick without any cold data."""
    model, pipeline = recommender.model, recommender.pipeline
    temperature = model.config.similarity_temperature
    full = F.normalize(pipeline.item_embeddings, dim=-1)
    warm_rows = torch.nonzero(model.warm_items[: full.shape[0]]).squeeze(1)
    text_only = _text_only_items(model, full.shape[0])
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(split.valid), generator=generator)[:max_users].tolist()  # bounds the (users, items) scores
    histories = [split.valid.histories[row] for row in rows]
    users = F.normalize(pipeline.user_embeddings(histories), dim=-1)
    excluded = history_exclude_mask(histories, full.shape[0] - 1, users.device)
    excluded[:, 0] = True  # padding
    targets = torch.as_tensor([split.valid.targets[row] for row in rows], device=users.device)
    grid = np.round(np.arange(-0.05, 0.2001, 0.005), 3)
    likelihood = np.zeros(len(grid))
    for _ in range(repeats):
        pseudo = warm_rows[torch.randperm(len(warm_rows), generator=generator)[: int(share * len(warm_rows))]]
        is_pseudo = torch.zeros(full.shape[0], dtype=torch.bool)
        is_pseudo[pseudo] = True
        base = users @ torch.where(is_pseudo.unsqueeze(1), text_only, full).T / temperature
        for position, offset in enumerate(grid):
            scores = (base + is_pseudo.to(base.dtype) * (offset / temperature)).masked_fill(excluded, float("-inf"))
            likelihood[position] += (scores.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(scores, 1)).mean().item()
    best = int(np.argmax(likelihood))
    return {"offset": float(grid[best]), "share": share, "repeats": repeats,
            "mean_log_likelihood": float(likelihood[best] / repeats), "at_zero": float(likelihood[np.argmin(abs(grid))] / repeats)}


def _text_only_items(model, rows: int) -> torch.Tensor:
    """Every item's normalised representation without its ID part (what a new item gets)."""
    warm = model.warm_items.clone()
    try:
        model.warm_items.zero_()
        return F.normalize(model.item_embeddings()[:rows], dim=-1)
    finally:
        model.warm_items.copy_(warm)
