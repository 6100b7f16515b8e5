"""The Python API on a trained planted-data model: raw ids in, ranked (id, score) lists out."""

from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmrec import ModelFolderError, Recommender, UnknownItemError
from llmrec.errors import InvalidRequestError


@pytest.fixture(scope="module")
def recommender(trained_run) -> Recommender:
    output_dir, _ = trained_run
    return Recommender.from_pretrained(output_dir)


@pytest.fixture(scope="module")
def user_history(planted_data_dir) -> list[str]:
    with open(planted_data_dir / "interactions.csv") as handle:
        return [row["item_id"] for row in csv.DictReader(handle) if row["user_id"] == "u1"]


def test_recommend_returns_k_new_items_best_first(recommender, user_history):
    history = user_history[:-1]
    ranked = recommender.recommend(history, k=5)
    assert len(ranked) == 5
    assert all(isinstance(item_id, str) and isinstance(score, float) for item_id, score in ranked)
    scores = [score for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    assert not set(history) & {item_id for item_id, _ in ranked}
    assert ranked[0][0] == user_history[-1]  # the planted next item


def test_batch_forms_match_single_calls(recommender, user_history):
    histories = [user_history[:5], user_history[:8]]
    batch = recommender.recommend_batch(histories, k=4)
    for history, ranked in zip(histories, batch):
        single = recommender.recommend(history, k=4)
        assert [item for item, _ in ranked] == [item for item, _ in single]
        np.testing.assert_allclose([s for _, s in ranked], [s for _, s in single], rtol=1e-5, atol=1e-5)
    candidates = [["i1", "i2", "i30"], ["i5", "i9"]]
    reranked = recommender.rerank_batch(histories, candidates)
    assert [sorted(item for item, _ in row) for row in reranked] == [sorted(row) for row in candidates]
    assert recommender.rerank(histories[1], candidates[1]) == reranked[1]


def test_rerank_agrees_with_recommend_scores(recommender, user_history):
    history = user_history[:-1]
    recommended = dict(recommender.recommend(history, k=3))
    reranked = dict(recommender.rerank(history, list(recommended)))
    for item_id, score in recommended.items():
        assert reranked[item_id] == pytest.approx(score, rel=1e-5, abs=1e-5)


def test_unknown_item_ids_are_named(recommender):
    with pytest.raises(UnknownItemError, match="'nope'") as error:
        recommender.recommend(["i1", "nope", "i2"])
    assert error.value.item_ids == ["nope"]
    with pytest.raises(UnknownItemError, match="'ghost'"):
        recommender.rerank(["i1"], ["i2", "ghost"])


def test_empty_history_falls_back_to_popularity(recommender):
    ranked = recommender.recommend([], k=3)
    assert len(ranked) == 3
    popularity = dict(zip(recommender.item_ids, recommender.item_popularity))
    assert [score for _, score in ranked] == sorted(popularity.values(), reverse=True)[:3]


def test_k_beyond_catalogue_returns_every_unseen_item(recommender, user_history):
    history = user_history[:3]
    ranked = recommender.recommend(history, k=10_000)
    assert len(ranked) == len(recommender.item_ids) - len(set(history))


def test_explain_weights_are_a_distribution_over_history(recommender, user_history):
    history = user_history[:6]
    weights = recommender.explain(history, "i3")
    assert [item for item, _ in weights] == history
    values = np.array([weight for _, weight in weights])
    assert (values >= 0).all() and values.sum() == pytest.approx(1.0, abs=1e-5)
    per_head = recommender.explain(history, "i3", per_head=True)
    assert len(per_head[0][1]) == recommender.model.config.rerank_num_heads


def test_loaded_folder_scores_like_the_saved_one(recommender, tmp_path, user_history):
    recommender.save_pretrained(tmp_path / "copy")
    copy = Recommender.from_pretrained(tmp_path / "copy")
    history = user_history[:7]
    assert copy.recommend(history, k=5) == recommender.recommend(history, k=5)


def test_missing_files_are_named(trained_run, tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        Recommender.from_pretrained(tmp_path / "absent")
    with pytest.raises(ModelFolderError, match="neither a local model folder nor a Hub repo"):
        Recommender.from_pretrained("runs-that-do-not-exist/ml100k")
    output_dir, _ = trained_run
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((output_dir / "config.json").read_text())
    with pytest.raises(ModelFolderError, match="model.safetensors"):
        Recommender.from_pretrained(partial)


# ----- exclude and filter -----------------------------------------------------------------------------


def test_exclude_and_filter(recommender, user_history):
    history = user_history[:-1]
    best = [item for item, _ in recommender.recommend(history, k=5)]
    without_best = [item for item, _ in recommender.recommend(history, k=5, exclude=best[:2])]
    assert without_best[:3] == best[2:]
    allowed = ["i0", "i1", "i2", "i40", "i79", history[0]]
    only = recommender.recommend(history, k=10, filter=allowed)
    assert {item for item, _ in only} == set(allowed) - set(history)
    same = recommender.recommend(history, k=10, filter=lambda item_id: item_id in allowed)
    assert same == only
    with_history = recommender.recommend(history, k=len(recommender.item_ids), exclude_history=False)
    assert set(history) <= {item for item, _ in with_history}
    assert recommender.recommend(history, k=3, filter=[]) == []
    # A cold user obeys the same rules.
    popular = recommender.recommend([], k=3, exclude=[recommender.recommend([], k=1)[0][0]], filter=lambda i: i != "i5")
    assert len(popular) == 3 and "i5" not in dict(popular)


BAD_REQUESTS = {
    "k zero": (lambda r: r.recommend(["i1"], k=0), InvalidRequestError, "k must be a positive integer"),
    "k float": (lambda r: r.recommend(["i1"], k=2.5), InvalidRequestError, "k must be a positive integer"),
    "history as a string": (lambda r: r.recommend("i1"), InvalidRequestError, "not the single string 'i1'"),
    "id of the wrong type": (lambda r: r.recommend(["i1", None]), InvalidRequestError, "not item ids: \\[None\\]"),
    "float id": (lambda r: r.recommend([1.5]), InvalidRequestError, "not item ids: \\[1.5\\]"),
    "unknown id": (lambda r: r.recommend(["i1", "zzz"]), UnknownItemError, "'zzz'"),
    "unknown exclude": (lambda r: r.recommend(["i1"], exclude=["zzz"]), UnknownItemError, "'zzz'"),
    "unknown filter id": (lambda r: r.recommend(["i1"], filter=["zzz"]), UnknownItemError, "'zzz'"),
    "duplicate candidates": (lambda r: r.rerank(["i1"], ["i2", "i3", "i2"]), InvalidRequestError, "\\['i2'\\] appear more than once"),
    "candidate lists mismatch": (lambda r: r.rerank_batch([["i1"]], [["i2"], ["i3"]]), InvalidRequestError, "1 histories but 2"),
    "explain empty history": (lambda r: r.explain([], "i1"), InvalidRequestError, "non-empty history"),
    "explain unknown item": (lambda r: r.explain(["i1"], "zzz"), UnknownItemError, "'zzz'"),
    "add_items duplicate": (lambda r: r.add_items(["i1"], ["movie"]), InvalidRequestError, "\\['i1'\\] are already"),
    "add_items lengths": (lambda r: r.add_items(["n1", "n2"], ["movie"]), InvalidRequestError, "2 ids but 1 texts"),
    "add_items empty text": (lambda r: r.add_items(["n1"], ["  "]), InvalidRequestError, "have no text"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_raise_clear_errors(recommender, case):
    call, error_type, message = BAD_REQUESTS[case]
    with pytest.raises(error_type, match=message):
        call(recommender)


def test_integer_ids_are_accepted_as_strings(trained_run):
    output_dir, _ = trained_run
    recommender = Recommender.from_pretrained(output_dir)
    recommender.add_items([12345], ["movie number 3 genre g2"])
    assert "12345" in recommender.item_ids
    assert recommender.rerank(["i1"], [12345]) == recommender.rerank(["i1"], ["12345"])


# ----- adding items -----------------------------------------------------------------------------------


def test_added_items_are_recommendable_at_once_and_saved(trained_run, tmp_path):
    """A new item described like genre g1 ranks high for a g1 user and low for a g0 user, with no retraining."""
    output_dir, _ = trained_run
    recommender = Recommender.from_pretrained(output_dir)
    g1_history = [f"i{20 + position}" for position in range(8)]
    g0_history = [f"i{position}" for position in range(8)]
    recommender.add_items(["new-g1"], ["movie number 99 genre g1"])
    assert recommender.num_items == 81 and recommender.pipeline.index.num_items == 81

    def rank_of(history):
        ranked = [item for item, _ in recommender.recommend(history, k=recommender.num_items)]
        return ranked.index("new-g1")

    assert rank_of(g1_history) < 20  # among the 20 g1 items out of 73 unseen
    assert rank_of(g0_history) > rank_of(g1_history)
    assert recommender.recommend(g1_history, k=1, filter=["new-g1"])[0][0] == "new-g1"

    recommender.save_pretrained(tmp_path / "grown")
    reloaded = Recommender.from_pretrained(tmp_path / "grown")
    assert reloaded.item_ids[-1] == "new-g1" and reloaded.item_texts[-1] == "movie number 99 genre g1"
    before, after = recommender.recommend(g1_history, k=5), reloaded.recommend(g1_history, k=5)
    assert [item for item, _ in after] == [item for item, _ in before]
    np.testing.assert_allclose([score for _, score in after], [score for _, score in before], atol=1e-6)


# ----- concurrency and fuzzing -------------------------------------------------------------------------


def test_threads_share_one_recommender(trained_run):
    output_dir, _ = trained_run
    recommender = Recommender.from_pretrained(output_dir)
    histories = [[f"i{(start + step) % 80}" for step in range(1 + start % 7)] for start in range(40)]
    expected = [recommender.recommend(history, k=5) for history in histories]

    def serve(row: int):
        return recommender.recommend(histories[row], k=5)

    with ThreadPoolExecutor(max_workers=4) as pool:
        adding = pool.submit(recommender.add_items, [f"new{n}" for n in range(5)], ["movie number 7 genre g3"] * 5)
        results = list(pool.map(serve, range(len(histories))))
        adding.result()
    for got, want in zip(results, expected):
        # Added items may enter a list, but every item that both lists share keeps its score.
        shared = dict(want).keys() & dict(got).keys()
        assert all(dict(got)[item] == pytest.approx(dict(want)[item], abs=1e-5) for item in shared)
        assert all(item in recommender.item_index for item, _ in got)
    assert recommender.num_items == 85


ITEM_IDS = st.sampled_from([f"i{n}" for n in range(80)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    history=st.lists(ITEM_IDS, max_size=30),
    candidates=st.lists(ITEM_IDS, max_size=15, unique=True),
    k=st.integers(min_value=1, max_value=100),
)
def test_fuzzed_histories_and_candidates(recommender, history, candidates, k):
    ranked = recommender.recommend(history, k=k)
    items = [item for item, _ in ranked]
    assert len(items) == len(set(items)) == min(k, 80 - len(set(history)))
    assert not set(items) & set(history)
    scores = [score for _, score in ranked]
    assert all(np.isfinite(scores)) and scores == sorted(scores, reverse=True)
    reranked = recommender.rerank(history, candidates)
    assert sorted(item for item, _ in reranked) == sorted(candidates)
    assert all(np.isfinite(score) for _, score in reranked)


def test_serving_excludes_the_history_as_the_model_was_trained(trained_run, tmp_path, user_history):
    """retrieval.exclude_history is stored in config.json, and recommend's default follows it."""
    output_dir, results = trained_run
    assert results["config"]["retrieval"]["exclude_history"] is True
    assert Recommender.from_pretrained(output_dir).model.config.exclude_history is True
    repeat_consumption = Recommender.from_pretrained(output_dir)
    repeat_consumption.model.config.exclude_history = False  # as a run with retrieval.exclude_history false saves it
    repeat_consumption.save_pretrained(tmp_path / "repeat")
    reloaded = Recommender.from_pretrained(tmp_path / "repeat")
    everything = len(reloaded.item_ids)
    served = {item for item, _ in reloaded.recommend(user_history, k=everything)}
    assert set(user_history) <= served
    assert not set(user_history) & {item for item, _ in reloaded.recommend(user_history, k=everything, exclude_history=True)}
    trained_default = Recommender.from_pretrained(output_dir)
    assert not set(user_history) & {item for item, _ in trained_default.recommend(user_history, k=everything)}


def test_a_run_without_history_exclusion_saves_it_for_serving(tmp_path, planted_data_dir, tiny_encoder_dir, user_history):
    from conftest import tiny_overrides

    from llmrec.config import load_config
    from llmrec.finetune import run_finetune

    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "repeat")
    overrides["training"].update({"retrieval_epochs": 1, "rerank_epochs": 0})
    overrides["retrieval"]["exclude_history"] = False
    run_finetune(load_config(overrides=overrides))
    assert json.loads((tmp_path / "repeat" / "config.json").read_text())["exclude_history"] is False
    served = Recommender.from_pretrained(tmp_path / "repeat")
    assert set(user_history) <= {item for item, _ in served.recommend(user_history, k=len(served.item_ids))}
