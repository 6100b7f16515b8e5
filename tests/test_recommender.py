"""The Python API on a trained planted-data model: raw ids in, ranked (id, score) lists out."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from llmrec import ModelFolderError, Recommender, UnknownItemError


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
