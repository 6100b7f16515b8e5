"""The co-occurrence probe's feature leaves each example's own user out of the counts (bench/rerank_cooccurrence_probe.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rerank_cooccurrence_probe import LeaveUserOutCooccurrence  # noqa: E402

SEQUENCES = [[1, 2, 3], [2, 1, 4], [2, 3]]  # users 0, 1, 2 over items 1..4


def test_cosines_count_only_the_other_users():
    features = LeaveUserOutCooccurrence(SEQUENCES, num_items=4, window=10)
    # User 0 (history 1, 2; padded). Without user 0: item 1 has user {1}, item 2 {1, 2}, item 3 {2}, item 4 {1}.
    out = features(torch.tensor([[3, 4]]), torch.tensor([[0, 1, 2]]))
    cos_13, cos_23, cos_14, cos_24 = 0.0, 1 / 2**0.5, 1.0, 1 / 2**0.5
    expected = [[max(cos_13, cos_23), (cos_13 + cos_23) / 2, cos_23], [max(cos_14, cos_24), (cos_14 + cos_24) / 2, cos_24]]
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_a_training_target_gets_no_credit_from_its_own_user():
    features = LeaveUserOutCooccurrence([[1, 2], [3, 4]], num_items=4, window=10)
    # Item 2 co-occurs with item 1 only in user 0's own sequence: left out, the cosine is 0, not 1.
    assert features(torch.tensor([[2]]), torch.tensor([[1]])).abs().sum() == 0


def test_registered_histories_map_to_their_user_and_unknown_ones_are_refused():
    features = LeaveUserOutCooccurrence(SEQUENCES, num_items=4, window=10)
    features.register([[2, 3, 1]], [2])  # user 2's train items plus a valid item
    assert features.users(torch.tensor([[0, 2, 3, 1]])).tolist() == [2]
    with pytest.raises(RuntimeError, match="no user, or two"):
        features.users(torch.tensor([[4, 4, 4]]))
    with pytest.raises(RuntimeError, match="no user, or two"):
        features.users(torch.tensor([[0, 0, 2]]))  # user 1's and user 2's first window
