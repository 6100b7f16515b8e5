"""Ranks and metrics checked against hand-computed values; these numbers get reported, so each case pins an exact result."""

import math

import numpy as np
import pytest
import torch

from llmrec.evaluation import (
    evaluate_ranking,
    popularity_scores,
    ranking_metrics,
    scores_from_candidates,
    target_ranks,
)

NAN = float("nan")
INF = float("inf")


def test_ranks_count_only_strictly_better_and_tied_items():
    # items 1..5; column 0 holds a huge score that must never count
    scores = torch.tensor(
        [
            [100.0, 0.9, 0.1, 0.5, 0.3, 0.2],  # target 1 is best -> rank 0
            [100.0, 0.9, 0.1, 0.5, 0.3, 0.2],  # target 4 (0.3): beaten by 0.9, 0.5 -> rank 2
            [100.0, 0.9, 0.1, 0.5, 0.3, 0.2],  # target 2 (0.1) is worst -> rank 4
        ]
    )
    ranks = target_ranks(scores, torch.tensor([1, 4, 2]))
    assert ranks.dtype == torch.long
    assert ranks.tolist() == [0, 2, 4]


def test_ties_are_pessimistic_so_constant_scores_get_no_credit():
    num_items = 30
    scores = torch.zeros(2, num_items + 1)
    ranks = target_ranks(scores, torch.tensor([1, 17]))
    assert ranks.tolist() == [num_items - 1, num_items - 1]
    metrics = ranking_metrics(ranks, ks=(10, 20))
    assert metrics == {"ndcg@10": 0.0, "hr@10": 0.0, "mrr@10": 0.0, "ndcg@20": 0.0, "hr@20": 0.0, "mrr@20": 0.0}

    # one tie with the target: rank 1, not 0
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.1]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [1]
    assert target_ranks(scores, torch.tensor([2])).tolist() == [1]


def test_excluded_history_never_outranks_target_and_target_is_never_excluded():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.1]])
    exclude = torch.tensor([[False, True, True, False, False]])
    assert target_ranks(scores, torch.tensor([3]), exclude).tolist() == [0]
    assert target_ranks(scores, torch.tensor([3])).tolist() == [2]
    # the target itself in the mask (held-out item also seen earlier) still gets ranked normally
    exclude_with_target = torch.tensor([[False, True, False, True, False]])
    assert target_ranks(scores, torch.tensor([3]), exclude_with_target).tolist() == [1]


def test_padding_column_never_counts():
    scores = torch.tensor([[INF, 0.2, 0.1], [NAN, 0.2, 0.1], [0.1, 0.1, 0.1]])
    assert target_ranks(scores, torch.tensor([1, 1, 2])).tolist() == [0, 0, 1]


def test_non_finite_target_is_a_miss_at_every_k():
    num_items = 4
    scores = torch.tensor(
        [
            [0.0, NAN, 0.1, 0.2, 0.3],
            [0.0, INF, 0.1, 0.2, 0.3],
            [0.0, -INF, -INF, -INF, -INF],
            [NAN, NAN, NAN, NAN, NAN],  # an untrained model producing NaN everywhere
        ]
    )
    ranks = target_ranks(scores, torch.tensor([1, 1, 1, 2]))
    assert ranks.tolist() == [num_items] * 4
    metrics = ranking_metrics(ranks, ks=(1, 4))
    assert all(value == 0.0 for value in metrics.values())


def test_non_finite_target_stays_a_miss_when_k_exceeds_the_catalogue():
    num_items = 3
    scores = torch.tensor([[0.0, NAN, 0.2, 0.1], [0.0, 0.1, 0.2, 0.3]])
    metrics = evaluate_ranking(lambda h: scores[: len(h)], [[], []], [1, 1], num_items, ks=(10,))
    # user 0: NaN target -> miss; user 1: rank 2 of 3 -> a hit at 10 (the whole catalogue fits)
    assert metrics["hr@10"] == 0.5
    assert metrics["ndcg@10"] == pytest.approx(0.5 * 1 / math.log2(4), abs=1e-12)


def test_nan_scores_of_other_items_do_not_hurt_the_target():
    scores = torch.tensor([[0.0, NAN, 0.5, NAN, 0.7], [0.0, NAN, -INF, NAN, 0.7]])
    assert target_ranks(scores, torch.tensor([2, 4])).tolist() == [1, 0]


def test_targets_out_of_range_are_rejected():
    scores = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="1-based"):
        target_ranks(scores, torch.tensor([0]))
    with pytest.raises(ValueError, match="1-based"):
        target_ranks(scores, torch.tensor([4]))


def test_ranking_metrics_hand_computed():
    ranks = torch.tensor([0, 2, 10, 25])
    metrics = ranking_metrics(ranks, ks=(10, 20))
    assert list(metrics) == ["ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20", "mrr@20"]
    assert all(type(value) is float for value in metrics.values())
    # rank 0 -> ndcg 1, mrr 1; rank 2 -> ndcg 1/log2(4) = 0.5, mrr 1/3; rank 10 -> miss at 10, hit at 20; rank 25 -> miss
    assert metrics["hr@10"] == pytest.approx(2 / 4, abs=1e-12)
    assert metrics["ndcg@10"] == pytest.approx((1.0 + 0.5) / 4, abs=1e-12)
    assert metrics["mrr@10"] == pytest.approx((1.0 + 1 / 3) / 4, abs=1e-12)
    assert metrics["hr@20"] == pytest.approx(3 / 4, abs=1e-12)
    assert metrics["ndcg@20"] == pytest.approx((1.0 + 0.5 + 1 / math.log2(12)) / 4, abs=1e-12)
    assert metrics["mrr@20"] == pytest.approx((1.0 + 1 / 3 + 1 / 11) / 4, abs=1e-12)


def test_rank_just_below_k_is_a_hit_and_rank_k_is_a_miss():
    assert ranking_metrics(torch.tensor([9]), ks=(10,))["hr@10"] == 1.0
    assert ranking_metrics(torch.tensor([10]), ks=(10,))["hr@10"] == 0.0
    assert ranking_metrics(torch.tensor([9]), ks=(10,))["ndcg@10"] == pytest.approx(1 / math.log2(11), abs=1e-12)


def test_ranking_metrics_rejects_empty_and_bad_input():
    with pytest.raises(ValueError, match="empty"):
        ranking_metrics(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError):
        ranking_metrics(torch.tensor([1]), ks=(0,))
    with pytest.raises(ValueError):
        ranking_metrics(torch.tensor([-1]))


def test_scores_from_candidates_dense_layout_and_padding():
    candidate_indices = torch.tensor([[3, 1, 0], [2, 0, 0]])
    candidate_scores = torch.tensor([[0.9, 0.4, 5.0], [0.7, 9.0, 9.0]])
    dense = scores_from_candidates(candidate_indices, candidate_scores, num_items=4)
    expected = torch.tensor([[-INF, 0.4, -INF, 0.9, -INF], [-INF, -INF, 0.7, -INF, -INF]])
    assert torch.equal(dense, expected)


def test_evaluate_ranking_with_retrieved_candidates_on_tiny_catalogue():
    num_items = 5
    histories = [[1], [2, 3], [4]]
    targets = [2, 5, 1]
    # user 0: retrieved 2 (best) -> rank 0; user 1: target 5 not retrieved -> miss;
    # user 2: retrieved 4 (history, excluded), 3, 1 -> target 1 ranks 1
    candidate_indices = torch.tensor([[2, 3, 0], [1, 4, 0], [4, 3, 1]])
    candidate_scores = torch.tensor([[0.9, 0.5, -INF], [0.8, 0.6, -INF], [0.9, 0.8, 0.7]])
    dense = scores_from_candidates(candidate_indices, candidate_scores, num_items)

    def score_fn(batch_histories):
        rows = [histories.index(history) for history in batch_histories]
        return dense[rows]

    metrics = evaluate_ranking(score_fn, histories, targets, num_items, ks=(1, 2), batch_size=2)
    assert metrics["num_users"] == 3
    assert metrics["hr@1"] == pytest.approx(1 / 3, abs=1e-12)
    assert metrics["hr@2"] == pytest.approx(2 / 3, abs=1e-12)
    assert metrics["ndcg@2"] == pytest.approx((1.0 + 1 / math.log2(3)) / 3, abs=1e-12)
    assert metrics["mrr@2"] == pytest.approx((1.0 + 0.5) / 3, abs=1e-12)

    without_exclusion = evaluate_ranking(score_fn, histories, targets, num_items, ks=(1, 2), exclude_history=False)
    assert without_exclusion["hr@2"] == pytest.approx(1 / 3, abs=1e-12)  # user 2's target drops to rank 2


def test_popularity_scores_hand_made():
    popularity = np.array([1000.0, 5.0, 50.0, 20.0, 1.0])  # entry 0 (padding) is ignored
    score_fn = popularity_scores(popularity)
    scores = score_fn([[1], [2, 3]])
    assert scores.shape == (2, 5)
    histories = [[2], [2, 3], [], [1]]
    targets = [3, 1, 1, 4]
    # ranks: user0 3 vs {1:5, 4:1} (2 excluded) -> 0; user1 1 vs {4} -> 0; user2 1 vs {2,3} -> 2; user3 4 vs {2,3} -> 2
    metrics = evaluate_ranking(score_fn, histories, targets, num_items=4, ks=(1, 3))
    assert metrics["hr@1"] == 0.5
    assert metrics["hr@3"] == 1.0
    assert metrics["mrr@3"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 3) / 4, abs=1e-12)
    assert metrics["ndcg@3"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4, abs=1e-12)


def _replaying_score_fn(user_scores):
    """Score function that hands out rows of a fixed score matrix in call order, whatever the batch size."""
    next_row = [0]

    def score_fn(batch_histories):
        start = next_row[0]
        next_row[0] += len(batch_histories)
        return user_scores[start : next_row[0]]

    score_fn.scores_in_input_order = True  # rows are paired with users by call order
    return score_fn


def test_batching_does_not_change_results():
    generator = torch.Generator().manual_seed(0)
    num_items, num_users = 40, 37
    user_scores = torch.randn(num_users, num_items + 1, generator=generator)
    user_scores[5, 7] = NAN
    user_scores[6, 1:] = 0.0  # a constant row: ties everywhere
    rng = np.random.default_rng(0)
    histories = [
        [int(item) for item in rng.choice(np.arange(1, num_items + 1), size=rng.integers(0, 6), replace=False)]
        for _ in range(num_users)
    ]
    targets = [int(rng.integers(1, num_items + 1)) for _ in range(num_users)]

    one_batch = evaluate_ranking(_replaying_score_fn(user_scores), histories, targets, num_items, ks=(5, 10), batch_size=1000)
    small_batches = evaluate_ranking(_replaying_score_fn(user_scores), histories, targets, num_items, ks=(5, 10), batch_size=4)
    assert one_batch == small_batches
    assert one_batch["num_users"] == num_users

    exclude = torch.zeros(num_users, num_items + 1, dtype=torch.bool)
    for row, history in enumerate(histories):
        exclude[row, history] = True
    direct = ranking_metrics(target_ranks(user_scores, torch.tensor(targets), exclude), ks=(5, 10))
    assert {key: value for key, value in one_batch.items() if key != "num_users"} == direct


def test_a_score_function_that_takes_positions_is_paired_by_position_in_every_pass():
    generator = torch.Generator().manual_seed(1)
    num_items, num_users = 30, 23
    user_scores = torch.randn(num_users, num_items + 1, generator=generator)
    histories = [[1 + (user % num_items)] * (user % 4) for user in range(num_users)]  # lengths differ: no length order
    targets = [1 + ((user * 7) % num_items) for user in range(num_users)]
    seen = []

    def by_position(batch_histories, positions):
        seen.append([int(position) for position in positions])
        assert batch_histories == [histories[position] for position in positions]
        return user_scores[torch.as_tensor(positions)]

    by_position.takes_positions = True
    exclude = torch.zeros(num_users, num_items + 1, dtype=torch.bool)
    for row, history in enumerate(histories):
        exclude[row, history] = True
    direct = {**ranking_metrics(target_ranks(user_scores, torch.tensor(targets), exclude), ks=(5, 10)), "num_users": num_users}
    for batch_size in (4, 4, 100):  # the same function twice, then in one batch
        assert evaluate_ranking(by_position, histories, targets, num_items, ks=(5, 10), batch_size=batch_size) == direct
    assert seen[0] == list(range(4))  # input order, not length order


def test_evaluate_ranking_checks_shapes():
    with pytest.raises(ValueError, match="pair up"):
        evaluate_ranking(lambda h: torch.zeros(len(h), 4), [[1]], [1, 2], num_items=3)
    with pytest.raises(ValueError, match="expected"):
        evaluate_ranking(lambda h: torch.zeros(len(h), 3), [[1]], [2], num_items=3)
