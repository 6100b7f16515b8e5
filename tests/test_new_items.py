"""New items by text: a planted new item reaches its fans' top 10, and `recommend(..., new_items=n)` slots."""

from __future__ import annotations

import pytest

from conftest import ITEMS_PER_GENRE
from llmrec import Recommender
from llmrec.errors import InvalidRequestError
from llmrec.recommender import RankedItem


def _fan_history(genre: int, length: int = 12, start: int = 0) -> list[str]:
    """A user who watched `length` films of one genre in the planted order (items i0..i79, 20 per genre)."""
    return [f"i{genre * ITEMS_PER_GENRE + (start + step) % ITEMS_PER_GENRE}" for step in range(length)]


@pytest.fixture(scope="module")
def with_new_items(trained_run) -> Recommender:
    recommender = Recommender.from_pretrained(trained_run[0])
    # Titles no training item has; only the genre word carries the taste.
    recommender.add_items(["new-g0", "new-g2"], ["movie number 77 genre g0", "movie number 88 genre g2"])
    return recommender


def test_new_item_matching_a_taste_reaches_that_users_top10_and_not_the_opposite_users(with_new_items):
    # Four films seen, so 16 warm films of the same genre, each with a trained ID row and the sequence behind it,
    # compete with the new one for the 10 slots: it gets in only if text-only items are scored on the warm scale.
    for start in (0, 5, 10, 15):
        fan_a, fan_b = _fan_history(0, length=4, start=start), _fan_history(2, length=4, start=start)
        top_a = [item for item, _ in with_new_items.recommend(fan_a, k=10)]
        top_b = [item for item, _ in with_new_items.recommend(fan_b, k=10)]
        assert "new-g0" in top_a, top_a
        assert "new-g0" not in top_b, top_b
        assert "new-g2" in top_b, top_b
        assert "new-g2" not in top_a, top_a


def test_new_items_zero_is_the_plain_ranking(with_new_items):
    history = _fan_history(1)
    plain = with_new_items.recommend(history, k=10)
    assert with_new_items.recommend(history, k=10, new_items=0) == plain
    assert all(type(item) is tuple for item in plain)


def test_new_items_reserves_slots_for_the_best_new_items_and_flags_them(with_new_items):
    history = _fan_history(1)  # a g1 fan: neither new item is a natural top-10 pick
    plain = with_new_items.recommend(history, k=10)
    reserved = with_new_items.recommend(history, k=10, new_items=2)
    assert len(reserved) == 10 and all(isinstance(item, RankedItem) for item in reserved)
    flagged = [item_id for item_id, _ in reserved if item_id.startswith("new-")]
    assert sorted(flagged) == ["new-g0", "new-g2"]
    assert [item[0] for item in reserved if item.reserved] == [item[0] for item in reserved if item[0].startswith("new-")]
    # The warm items keep their order; the new ones take the last slots.
    warm = [item_id for item_id, _ in plain if not item_id.startswith("new-")]
    assert [item_id for item_id, _ in reserved if not item_id.startswith("new-")] == warm[: 10 - len(flagged)]
    one = with_new_items.recommend(history, k=10, new_items=1)
    assert sum(item.reserved for item in one) == 1
    batch = with_new_items.recommend_batch([history, _fan_history(0)], k=10, new_items=2)
    assert [(item[0], item.reserved) for item in batch[0]] == [(item[0], item.reserved) for item in reserved]
    assert [score for _, score in batch[0]] == pytest.approx([score for _, score in reserved], rel=1e-5)


@pytest.mark.parametrize("bad", [-1, 11, 1.5, True, "2"])
def test_new_items_must_be_an_integer_from_0_to_k(with_new_items, bad):
    with pytest.raises(InvalidRequestError, match="new_items"):
        with_new_items.recommend(_fan_history(0), k=10, new_items=bad)


def test_new_items_leave_the_popularity_answer_of_a_user_without_history_alone(with_new_items):
    plain = with_new_items.recommend([], k=5)
    with_slots = with_new_items.recommend([], k=5, new_items=2)
    assert all(isinstance(item, RankedItem) and not item.reserved for item in with_slots)
    assert [tuple(item) for item in with_slots] == [tuple(item) for item in plain]
    fan = _fan_history(0, length=4)
    mixed = with_new_items.recommend_batch([[], fan], k=10, new_items=2)
    alone = with_new_items.recommend(fan, k=10, new_items=2)
    assert [(item[0], item.reserved) for item in mixed[1]] == [(item[0], item.reserved) for item in alone]
    assert [tuple(item) for item in mixed[0]] == [tuple(item) for item in with_new_items.recommend([], k=10)]
