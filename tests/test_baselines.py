"""ItemKNN: similarities and scores worked out by hand on a four-user example, shapes, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from llmrec.evaluation import ItemKNN, evaluate_ranking

# Items 1..5; item 5 is never seen in training.
# Users per item: 1 -> {u1, u2} (n=2), 2 -> {u1, u2, u3} (n=3), 3 -> {u1, u4} (n=2), 4 -> {u3} (n=1).
# Shared users: (1,2) 2, (1,3) 1, (2,3) 1, (2,4) 1, every other pair 0.
TRAIN = [[1, 2, 3], [1, 2], [2, 4], [3]]
NUM_ITEMS = 5
S12, S13, S23, S24 = 2 / math.sqrt(6), 1 / 2, 1 / math.sqrt(6), 1 / math.sqrt(3)


def _expected(pairs: dict[tuple[int, int], float]) -> torch.Tensor:
    matrix = torch.zeros(NUM_ITEMS + 1, NUM_ITEMS + 1, dtype=torch.float64)
    for (row, column), value in pairs.items():
        matrix[row, column] = value
    return matrix


def test_cosine_of_co_occurrence_by_hand():
    knn = ItemKNN().fit(TRAIN, NUM_ITEMS)
    symmetric = {(1, 2): S12, (1, 3): S13, (2, 3): S23, (2, 4): S24}
    expected = _expected({**symmetric, **{(j, i): value for (i, j), value in symmetric.items()}})
    torch.testing.assert_close(knn.similarity, expected)


def test_shrinkage_adds_to_the_denominator():
    knn = ItemKNN(shrinkage=1.0).fit(TRAIN, NUM_ITEMS)
    assert knn.similarity[1, 2].item() == pytest.approx(2 / (math.sqrt(6) + 1))
    assert knn.similarity[4, 2].item() == pytest.approx(1 / (math.sqrt(3) + 1))
    assert knn.similarity[1, 3].item() == pytest.approx(1 / 3)


def test_top_k_keeps_each_rows_nearest_items_only():
    knn = ItemKNN(num_neighbors=1).fit(TRAIN, NUM_ITEMS)
    # Row 2's nearest is item 1 (0.816 > 0.577 > 0.408), so 2 -> 4 is pruned while 4 -> 2 survives.
    expected = _expected({(1, 2): S12, (2, 1): S12, (3, 1): S13, (4, 2): S24})
    torch.testing.assert_close(knn.similarity, expected)


def test_score_sums_the_rows_of_the_history_items():
    knn = ItemKNN().fit(TRAIN, NUM_ITEMS)
    scores = knn([[1, 4], [3, 3], [0, 1], []])
    assert scores.shape == (4, NUM_ITEMS + 1) and scores.dtype == torch.float64
    assert torch.isinf(scores[:, 0]).all() and (scores[:, 0] < 0).all()  # padding never ranks
    torch.testing.assert_close(scores[0, 1:], torch.tensor([0.0, S12 + S24, S13, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(scores[1, 1:], torch.tensor([S13, S23, 0.0, 0.0, 0.0], dtype=torch.float64))  # once
    torch.testing.assert_close(scores[2, 1:], torch.tensor([0.0, S12, S13, 0.0, 0.0], dtype=torch.float64))  # 0 = pad
    assert (scores[3, 1:] == 0).all()


def test_top_k_scores_by_hand():
    knn = ItemKNN(num_neighbors=1).fit(TRAIN, NUM_ITEMS)
    torch.testing.assert_close(knn([[3, 4]])[0, 1:], torch.tensor([S13, S24, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_repeated_training_items_count_once():
    once = ItemKNN().fit(TRAIN, NUM_ITEMS).similarity
    twice = ItemKNN().fit([[1, 2, 1, 3, 2], [1, 2, 2], [2, 4], [3, 3]], NUM_ITEMS).similarity
    torch.testing.assert_close(once, twice)


def test_plugs_into_the_evaluator():
    knn = ItemKNN().fit(TRAIN, NUM_ITEMS)
    # History [1]: item 2 (0.816) outranks item 3 (0.5); items 4 and 5 tie at 0, which counts against them.
    metrics = evaluate_ranking(knn, [[1], [1], [1]], [2, 3, 4], NUM_ITEMS, ks=[1, 2])
    assert metrics["hr@1"] == pytest.approx(1 / 3)
    assert metrics["hr@2"] == pytest.approx(2 / 3)
    assert metrics["mrr@2"] == pytest.approx((1 + 1 / 2) / 3)


@pytest.mark.parametrize("num_neighbors", [0, -1, 2.5])
def test_rejects_bad_neighbourhood_sizes(num_neighbors):
    with pytest.raises(ValueError, match="num_neighbors"):
        ItemKNN(num_neighbors=num_neighbors)


def test_rejects_negative_shrinkage():
    with pytest.raises(ValueError, match="shrinkage"):
        ItemKNN(shrinkage=-1.0)


def test_scoring_before_fit_says_what_to_do():
    with pytest.raises(RuntimeError, match="fit"):
        ItemKNN()([[1]])


def test_rejects_items_outside_the_catalogue():
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        ItemKNN().fit([[1, 6]], NUM_ITEMS)
    knn = ItemKNN().fit(TRAIN, NUM_ITEMS)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        knn([[-1]])
    with pytest.raises(ValueError, match="num_items"):
        ItemKNN().fit(TRAIN, 0)


def test_more_neighbours_than_items_keeps_everything():
    torch.testing.assert_close(ItemKNN(num_neighbors=50).fit(TRAIN, NUM_ITEMS).similarity,
                               ItemKNN().fit(TRAIN, NUM_ITEMS).similarity)
