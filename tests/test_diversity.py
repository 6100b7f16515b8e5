"""Issue 15, diversity on request: the top-k lists the evaluator keeps, coverage / ILD / popularity percentile on
hand-made lists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmrec.data import EvaluationExamples
from llmrec.evaluation import (
    catalogue_coverage,
    diversity_metrics,
    evaluate_ranking,
    evaluate_systems,
    history_exclude_mask,
    intra_list_diversity,
    mean_popularity_percentile,
    popularity_percentiles,
    top_items,
)

NAN = float("nan")

# Four items in 2-D: 1 and 2 orthogonal, 3 halfway between (cos 1/sqrt(2) with each), 4 a zero vector.
EMBEDDINGS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
HALF = 1.0 - 1.0 / math.sqrt(2.0)  # cosine distance between item 3 and item 1 or 2


# ----- the top-k lists of the evaluation -------------------------------------------------------------------


def test_top_items_lists_eligible_items_best_first_ties_to_the_lower_index():
    scores = torch.tensor([[9.0, 3.0, 1.0, 3.0, 3.0, NAN],
                           [9.0, 1.0, 1.0, 1.0, float("-inf"), 2.0]])
    assert top_items(scores, 3).tolist() == [[1, 3, 4], [5, 1, 2]]  # column 0 (padding) never, NaN never
    assert top_items(scores, 7).tolist() == [[1, 3, 4, 2, 0, 0, 0], [5, 1, 2, 3, 0, 0, 0]]  # -inf never either
    excluded = history_exclude_mask([[3], [5, 1]], 5)
    assert top_items(scores, 3, excluded).tolist() == [[1, 4, 2], [2, 3, 0]]


def test_top_items_agree_with_sorting_by_score_then_index():
    """Many ties: the lists are those of a plain sort by (score descending, item index), whatever the width."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 3, (6, 301), generator=generator).double()
    for k in (1, 7, 150, 300):
        expected = [sorted(range(1, 301), key=lambda item: (-float(row[item]), item))[:k] for row in scores]
        assert top_items(scores, k).tolist() == expected, k


def test_evaluate_ranking_keeps_top_lists_without_changing_its_metrics():
    generator = torch.Generator().manual_seed(0)
    num_items, users = 12, 9
    table = torch.randint(0, 4, (users, num_items + 1), generator=generator).float()  # many ties
    histories = [[1 + (user + step) % num_items for step in range(1 + user % 4)] for user in range(users)]
    row_of = {tuple(history): user for user, history in enumerate(histories)}
    assert len(row_of) == users
    targets = [1 + (user * 7 + 5) % num_items for user in range(users)]

    def score(batch: list[list[int]]) -> torch.Tensor:  # batched by history length, so rows arrive out of order
        return table[[row_of[tuple(history)] for history in batch]]

    plain = evaluate_ranking(score, histories, targets, num_items, ks=(3, 5), batch_size=2)
    lists = torch.full((users, 5), -1, dtype=torch.long)
    kept = evaluate_ranking(score, histories, targets, num_items, ks=(3, 5), batch_size=2, top_items_out=lists)
    assert kept == plain
    assert torch.equal(lists, top_items(table, 5, history_exclude_mask(histories, num_items)))
    for user, history in enumerate(histories):
        assert not set(history) & set(lists[user].tolist()) and (lists[user] > 0).all()
    one_batch = torch.zeros((users, 5), dtype=torch.long)
    evaluate_ranking(score, histories, targets, num_items, ks=(3, 5), batch_size=100, top_items_out=one_batch)
    assert torch.equal(one_batch, lists)
    with pytest.raises(ValueError, match="top_items_out"):
        evaluate_ranking(score, histories, targets, num_items, top_items_out=torch.zeros((users + 1, 5), dtype=torch.long))


# ----- the metrics on hand-made lists ----------------------------------------------------------------------


def test_catalogue_coverage_hand_computed():
    lists = torch.tensor([[1, 2, 0], [2, 3, 0]])
    assert catalogue_coverage(lists, 5) == pytest.approx(3 / 5)
    assert catalogue_coverage(lists[:, :1], 5) == pytest.approx(2 / 5)
    assert catalogue_coverage(torch.zeros((2, 3), dtype=torch.long), 5) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        catalogue_coverage(torch.tensor([[6]]), 5)


def test_intra_list_diversity_hand_computed():
    # [1, 2]: distance 1; [2, 3]: 1 - 1/sqrt(2); [1, 2, 3]: (1 + 2 * HALF) / 3.
    assert intra_list_diversity(torch.tensor([[1, 2], [2, 3]]), EMBEDDINGS) == pytest.approx((1 + HALF) / 2, abs=1e-6)
    assert intra_list_diversity(torch.tensor([[1, 2, 3]]), EMBEDDINGS) == pytest.approx((1 + 2 * HALF) / 3, abs=1e-6)
    # Identical items are at distance 0; a zero vector is at distance 1; a one-item list has no pair and is left out.
    assert intra_list_diversity(torch.tensor([[1, 1]]), EMBEDDINGS) == pytest.approx(0.0, abs=1e-6)
    assert intra_list_diversity(torch.tensor([[4, 1], [2, 0]]), EMBEDDINGS) == pytest.approx(1.0, abs=1e-6)
    assert intra_list_diversity(torch.tensor([[2, 0]]), EMBEDDINGS) == 0.0
    # Chunking users does not change the mean.
    lists = torch.tensor([[1, 2, 3], [2, 3, 0], [1, 3, 4]])
    assert intra_list_diversity(lists, EMBEDDINGS, chunk_size=1) == pytest.approx(intra_list_diversity(lists, EMBEDDINGS))


def test_popularity_percentile_hand_computed():
    popularity = np.array([0.0, 5, 1, 1, 0, 10])  # entry 0 = padding; sorted counts 0 1 1 5 10
    np.testing.assert_allclose(popularity_percentiles(popularity), [0.0, 0.8, 0.6, 0.6, 0.2, 1.0])
    lists = torch.tensor([[1, 2, 0], [2, 3, 0]])
    assert mean_popularity_percentile(lists, popularity_percentiles(popularity)) == pytest.approx((0.8 + 3 * 0.6) / 4)
    assert popularity_percentiles(np.array([0.0, 3, 3]))[1:].tolist() == [1.0, 1.0]  # all tied: all most popular
    with pytest.raises(ValueError, match="num_items"):
        popularity_percentiles(np.array([1.0]))


def test_diversity_metrics_at_each_k():
    lists = torch.tensor([[1, 2, 3], [2, 3, 0]])
    popularity = np.array([0.0, 5, 1, 1, 0])  # sorted counts 0 1 1 5: percentiles 1.0 0.75 0.75 0.25
    metrics = diversity_metrics(lists, 4, (1, 3), EMBEDDINGS, popularity)
    assert metrics == pytest.approx({
        "coverage@1": 2 / 4, "ild@1": 0.0, "popularity_percentile@1": (1.0 + 0.75) / 2,
        "coverage@3": 3 / 4, "ild@3": ((1 + 2 * HALF) / 3 + HALF) / 2, "popularity_percentile@3": (1.0 + 4 * 0.75) / 5,
    }, abs=1e-6)
    assert set(diversity_metrics(lists, 4, (2,))) == {"coverage@2"}  # no embeddings, no popularity: coverage only
    with pytest.raises(ValueError, match="need 4"):
        diversity_metrics(lists, 4, (4,))
    with pytest.raises(ValueError, match="rows"):
        diversity_metrics(lists, 4, (3,), EMBEDDINGS[:3])


def test_evaluate_systems_adds_the_diversity_of_the_ranking_pass():
    """Two systems over four items: one lists the same items for everyone, the other follows the user."""
    num_items = 4
    examples = EvaluationExamples([0, 1], [[1], [3]], [2, 4])
    same_for_all = torch.tensor([-math.inf, 4.0, 3.0, 2.0, 1.0])

    def popular(histories: list[list[int]]) -> torch.Tensor:
        return same_for_all.expand(len(histories), -1)

    def personal(histories: list[list[int]]) -> torch.Tensor:  # the item after the last one, then the one after that
        rows = torch.full((len(histories), num_items + 1), -math.inf)
        for row, history in enumerate(histories):
            rows[row, 1 + history[-1] % num_items] = 2.0
            rows[row, 1 + (history[-1] + 1) % num_items] = 1.0
        return rows

    popularity = np.array([0.0, 4, 3, 2, 1])
    results = evaluate_systems([("test", examples, {"popular": popular, "personal": personal})], num_items, ks=(1, 2),
                               item_text_embeddings=EMBEDDINGS, item_popularity=popularity)
    popular_metrics, personal_metrics = results["test"]["popular"], results["test"]["personal"]
    # Ranking metrics as evaluate_ranking gives them, and num_users still last.
    assert {key: popular_metrics[key] for key in ("ndcg@1", "hr@1", "mrr@1", "ndcg@2", "hr@2", "mrr@2", "num_users")} \
        == evaluate_ranking(popular, examples.histories, examples.targets, num_items, ks=(1, 2))
    assert list(popular_metrics)[-1] == "num_users"
    # popular, history removed: user 0 gets [2, 3], user 1 gets [1, 2].
    assert popular_metrics["coverage@1"] == pytest.approx(2 / 4) and popular_metrics["coverage@2"] == pytest.approx(3 / 4)
    assert popular_metrics["ild@2"] == pytest.approx((1 - 1 / math.sqrt(2) + 1) / 2, abs=1e-6)
    assert popular_metrics["popularity_percentile@2"] == pytest.approx((0.75 + 0.5 + 1.0 + 0.75) / 4)
    # personal: user 0 gets [2, 3], user 1 gets [4, 1].
    assert personal_metrics["hr@1"] == pytest.approx(1.0)
    assert personal_metrics["coverage@2"] == pytest.approx(1.0)
    assert personal_metrics["ild@2"] == pytest.approx(((1 - 1 / math.sqrt(2)) + 1.0) / 2, abs=1e-6)
    assert personal_metrics["popularity_percentile@1"] == pytest.approx((0.75 + 0.25) / 2)
