"""Splits must be chronological (ties in file order), leak-free and sized exactly as documented."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from llmrec.config import DataConfig
from llmrec.data import InteractionData, SequentialSplit, build_split, load_interaction_data
from llmrec.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
ITEMS = ["a", "b", "c", "d", "e", "f"]  # index 1..6; "f" is never interacted with


def _data(rows: list[tuple[str, str, float]]) -> InteractionData:
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype({"timestamp": "float64"})
    items = pd.DataFrame({"item_id": ITEMS, "text": [name.upper() for name in ITEMS]})
    return InteractionData(datasets.Dataset.from_pandas(interactions, preserve_index=False),
                           datasets.Dataset.from_pandas(items, preserve_index=False))


def _idx(names: str) -> list[int]:
    return [ITEMS.index(name) + 1 for name in names]


LEAVE_ONE_OUT_ROWS = [  # file order; timestamps tie on purpose
    ("u1", "a", 10), ("u2", "c", 5), ("u1", "c", 30), ("u1", "b", 30), ("u1", "d", 20),
    ("u2", "d", 6), ("u3", "e", 1), ("u3", "c", 2), ("u3", "a", 2), ("u3", "b", 2),
]


def test_leave_one_out_orders_by_time_and_keeps_ties_in_file_order() -> None:
    split = build_split(_data(LEAVE_ONE_OUT_ROWS), DataConfig(split="leave_one_out"))
    assert split.item_ids == ITEMS
    assert split.item_texts == ["A", "B", "C", "D", "E", "F"]
    assert split.num_items == 6
    assert split.item_index == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}
    assert split.user_ids == ["u1", "u2", "u3"]
    # u1: a(10) d(20) c(30) b(30) -- c before b because it comes first in the file.
    # u3: e(1) c(2) a(2) b(2). u2 has only 2 interactions: all training, no examples.
    assert split.train_sequences == [_idx("ad"), _idx("cd"), _idx("ec")]
    assert split.valid.user_indices == [0, 2]
    assert split.valid.histories == [_idx("ad"), _idx("ec")]
    assert split.valid.targets == _idx("ca")
    assert split.test.user_indices == [0, 2]
    assert split.test.histories == [_idx("adc"), _idx("eca")]
    assert split.test.targets == _idx("bb")
    assert len(split.valid) == len(split.test) == 2


def test_item_popularity_counts_training_interactions_only() -> None:
    split = build_split(_data(LEAVE_ONE_OUT_ROWS), DataConfig())
    popularity = split.item_popularity()
    assert popularity.dtype == np.float64
    assert popularity.tolist() == [0.0, 1.0, 0.0, 2.0, 2.0, 1.0, 0.0]  # pad, a, b, c, d, e, f


def test_temporal_split_uses_global_time_windows() -> None:
    rows = [  # 10 interactions: 20 % newest (t >= 9) -> test window, the 20 % before (7, 8) -> valid window
        ("u3", "c", 4), ("u1", "a", 1), ("u2", "a", 2), ("u1", "c", 7), ("u4", "d", 8),
        ("u1", "b", 3), ("u3", "d", 5), ("u2", "b", 10), ("u3", "e", 6), ("u1", "e", 9),
    ]
    config = DataConfig(split="temporal", temporal_valid_fraction=0.2, temporal_test_fraction=0.2)
    split = build_split(_data(rows), config)
    assert split.user_ids == ["u3", "u1", "u2", "u4"]
    assert split.train_sequences == [_idx("cde"), _idx("ab"), _idx("a"), []]  # u4 only acts in the valid window
    assert split.valid.user_indices == [1]  # u4's valid interaction has no history -> skipped
    assert split.valid.histories == [_idx("ab")]
    assert split.valid.targets == _idx("c")
    assert split.test.user_indices == [1, 2]
    assert split.test.histories == [_idx("abc"), _idx("a")]  # train and valid windows both count as history
    assert split.test.targets == _idx("e") + _idx("b")


def test_split_of_loaded_fixture_uses_catalogue_indices() -> None:
    data = load_interaction_data(DataConfig(format="recbole", path=str(FIXTURES / "recbole"), dataset_name="tiny"))
    split = build_split(data, DataConfig())
    assert split.item_ids == ["1", "2", "3", "4"]
    assert split.user_ids == ["1", "2", "3"]
    # user 1: item 3 (t=90), item 1 (t=100), item 2 (t=100, after item 1 in the file)
    assert split.train_sequences[0] == [3]
    assert (split.valid.targets, split.test.targets) == ([1], [2])
    assert split.test.histories == [[3, 1]]


def test_unknown_item_in_interactions_is_rejected() -> None:
    with pytest.raises(DataError, match="missing from the items table"):
        build_split(_data([("u1", "zzz", 1)]), DataConfig())


@pytest.fixture(scope="module")
def movielens_split() -> SequentialSplit:
    return build_split(load_interaction_data(DataConfig()), DataConfig())


def test_leave_one_out_on_movielens_100k_is_leak_free(movielens_split: SequentialSplit) -> None:
    split = movielens_split
    assert len(split.user_ids) == 943 and split.num_items == 1682
    assert len(split.test) == len(split.valid) == 943
    assert sum(len(sequence) for sequence in split.train_sequences) == 100000 - 2 * 943
    for position, user_index in enumerate(split.valid.user_indices):
        train = split.train_sequences[user_index]
        assert split.valid.histories[position] == train
        assert split.test.user_indices[position] == user_index
        assert split.test.histories[position] == train + [split.valid.targets[position]]


def test_movielens_popularity_matches_training_counts(movielens_split: SequentialSplit) -> None:
    popularity = movielens_split.item_popularity()
    assert popularity.shape == (1683,)
    assert popularity[0] == 0.0
    assert popularity.sum() == 100000 - 2 * 943
    counts = Counter(index for sequence in movielens_split.train_sequences for index in sequence)
    toy_story = movielens_split.item_index["1"]
    assert popularity[toy_story] == counts[toy_story] > 0
