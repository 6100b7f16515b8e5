"""Issue 15, diversity on request: the top-k lists the evaluator keeps, coverage / ILD / popularity percentile on
hand-made lists, MMR re-ranking (`diversity=λ`) through the Python API, the CLI and HTTP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llmrec import Recommender
from llmrec.cli import main
from llmrec.data import EvaluationExamples
from llmrec.errors import InvalidRequestError
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
from llmrec.ranking import check_diversity, diversified, mmr_order
from test_serving_safety import NUM_CANDIDATES, build_recommender

HISTORY = ["i1", "i5", "i9"]
NAN = float("nan")

# Four items in 2-D: 1 and 2 orthogonal, 3 halfway between (cos 1/sqrt(2) with each), 4 a zero vector.
EMBEDDINGS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
HALF = 1.0 - 1.0 / math.sqrt(2.0)  # cosine distance between item 3 and item 1 or 2


@pytest.fixture(scope="module")
def recommender(tiny_encoder_dir) -> Recommender:
    return build_recommender(tiny_encoder_dir)


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


# ----- MMR re-ranking --------------------------------------------------------------------------------------


def test_mmr_picks_the_unlike_item_once_diversity_outweighs_the_relevance_gap():
    # Items A and B share a direction, C is orthogonal: rel = 1, 0.95, 0 after min-max scaling.
    scores = np.array([3.0, 2.9, 1.0])
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    similarities = vectors @ vectors.T
    # Second pick: B scores (1 - λ) 0.95 - λ, C scores 0; they swap at λ = 0.95 / 1.95 ≈ 0.487.
    assert mmr_order(scores, similarities, 0.5, 3).tolist() == [0, 2, 1]
    assert mmr_order(scores, similarities, 0.45, 3).tolist() == [0, 1, 2]
    assert mmr_order(scores, similarities, 0.0, 3).tolist() == [0, 1, 2]
    assert mmr_order(scores, similarities, 1.0, 2).tolist() == [0, 2]  # λ = 1: still the most relevant item first
    # A negative cosine earns its item a bonus: D, opposite to A, beats the more relevant C.
    scores, vectors = np.array([3.0, 2.0, 1.0]), np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert mmr_order(scores, vectors @ vectors.T, 0.5, 2).tolist() == [0, 2]
    assert mmr_order(np.array([1.0, 1.0]), np.eye(2), 0.3, 5).tolist() == [0, 1]  # equal scores; k beyond the list
    # The penalty is the closest of *all* picks: after A and B, B's twin C loses to the less relevant D.
    scores = np.array([4.0, 3.0, 2.9, 1.0])
    vectors = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert mmr_order(scores, vectors @ vectors.T, 0.5, 4).tolist() == [0, 1, 3, 2]


def test_diversified_drops_padding_and_keeps_each_items_score():
    # Item 3 = (1, 1) is at cosine 0.71 from item 1 = (1, 0); item 2 = (0, 1) at 0. Padding and NaN are dropped.
    indices, scores = np.array([1, 3, 0, 2, 4]), np.array([3.0, 2.9, 5.0, 1.0, np.nan])
    # Second pick: item 3 scores (1 - λ) 0.95 - λ 0.71, item 2 scores 0.
    picked, picked_scores = diversified(indices, scores, EMBEDDINGS, 0.8, 3)
    assert picked.tolist() == [1, 2, 3] and picked_scores.tolist() == [3.0, 1.0, 2.9]
    assert diversified(indices, scores, EMBEDDINGS, 0.3, 3)[0].tolist() == [1, 3, 2]
    assert diversified(indices, scores, EMBEDDINGS, 0.8, 1)[0].tolist() == [1]


@pytest.mark.parametrize("diversity", [True, "0.5", NAN, -0.1, 1.5, [0.5], float("inf")])
def test_bad_diversity_is_refused_with_its_value(recommender, diversity):
    with pytest.raises(InvalidRequestError, match="diversity"):
        recommender.recommend(HISTORY, k=5, diversity=diversity)
    with pytest.raises(InvalidRequestError, match="diversity"):
        recommender.recommend_batch([HISTORY], k=5, diversity=diversity)


def test_check_diversity_accepts_numbers_from_zero_to_one():
    assert [check_diversity(value) for value in (None, 0, 1, 0.25, np.float32(0.5))] == [0.0, 0.0, 1.0, 0.25, 0.5]


def test_zero_diversity_is_exactly_the_plain_ranking(recommender):
    plain = recommender.recommend(HISTORY, k=NUM_CANDIDATES)
    for zero in (0, 0.0, None):
        assert recommender.recommend(HISTORY, k=NUM_CANDIDATES, diversity=zero) == plain
    assert recommender.recommend_batch([HISTORY, ["i2"]], k=12, diversity=0.0) == recommender.recommend_batch([HISTORY, ["i2"]], k=12)
    options = {"exclude": ["i3"], "exclude_history": False, "new_items": 2}
    assert recommender.recommend(HISTORY, k=6, diversity=0.0, **options) == recommender.recommend(HISTORY, k=6, **options)


def test_diversity_reorders_the_heads_candidates_by_mmr(recommender):
    """The answer is MMR over the head's whole ranked list (k = num_candidates gives that list), cut to k."""
    head_list = recommender.recommend(HISTORY, k=NUM_CANDIDATES)
    indices = np.array([recommender.item_index[item_id] for item_id, _ in head_list])
    scores = np.array([score for _, score in head_list])
    expected, expected_scores = diversified(indices, scores, recommender.pipeline.item_text_embeddings, 1.0, 5)
    diverse = recommender.recommend(HISTORY, k=5, diversity=1.0)
    assert [item_id for item_id, _ in diverse] == [recommender.item_ids[index - 1] for index in expected]
    assert [item_id for item_id, _ in diverse] != [item_id for item_id, _ in head_list[:5]]  # it did re-rank
    assert [score for _, score in diverse] == pytest.approx(expected_scores.tolist())  # relevance scores kept
    assert recommender.recommend_batch([HISTORY], k=5, diversity=1.0)[0] == diverse
    # k beyond the head's list: MMR re-orders the whole list, the retrieval tail follows as without diversity.
    long_plain, long_diverse = recommender.recommend(HISTORY, k=12), recommender.recommend(HISTORY, k=12, diversity=1.0)
    assert long_diverse[NUM_CANDIDATES:] == long_plain[NUM_CANDIDATES:] and len(long_diverse) == 12
    assert [item_id for item_id, _ in long_diverse[:5]] == [item_id for item_id, _ in diverse]
    assert sorted(long_diverse[:NUM_CANDIDATES]) == sorted(long_plain[:NUM_CANDIDATES])
    assert recommender.recommend(["i2"], k=5, diversity=1.0)  # another history, served too
    assert recommender.recommend([], k=3, diversity=1.0) == recommender.recommend([], k=3)  # popularity fallback as is


def test_an_added_item_with_the_top_items_text_is_pushed_down(tiny_encoder_dir):
    """add_items gives new items text embeddings: a copy of the top item's text is its twin, picked last at λ = 1."""
    recommender = build_recommender(tiny_encoder_dir)
    top_item = recommender.recommend(HISTORY, k=1)[0][0]
    recommender.add_items(["twin"], [recommender.item_texts[recommender.item_index[top_item] - 1]])
    embeddings = recommender.pipeline.item_text_embeddings
    assert embeddings.shape[0] == recommender.num_items + 1
    assert float(torch.cosine_similarity(embeddings[-1], embeddings[recommender.item_index[top_item]], dim=0)) > 0.9999
    plain = [item_id for item_id, _ in recommender.recommend(HISTORY, k=NUM_CANDIDATES)]
    assert plain.index("twin") < 2 and plain.index(top_item) < 2  # the twins lead the plain ranking
    diverse = [item_id for item_id, _ in recommender.recommend(HISTORY, k=NUM_CANDIDATES, diversity=1.0)]
    assert sorted(diverse) == sorted(plain)
    assert diverse[0] == plain[0] and diverse[-1] == plain[1]  # the first twin leads, the other comes last


def test_diversity_then_reserved_slots_for_new_items(tiny_encoder_dir):
    recommender = build_recommender(tiny_encoder_dir)
    recommender.add_items(["new-a", "new-b"], ["movie number 77 genre g0", "movie number 88 genre g2"])
    diverse = recommender.recommend(HISTORY, k=6, diversity=1.0, exclude=["i3"])
    with_slots = recommender.recommend(HISTORY, k=6, diversity=1.0, exclude=["i3"], new_items=2)
    flagged = [item[0] for item in with_slots if item.reserved]
    assert sorted(flagged) == ["new-a", "new-b"] and "i3" not in {item_id for item_id, _ in with_slots}
    # The diversified order is kept; the new items take the last slots, as without diversity.
    kept = [item_id for item_id, _ in diverse if not item_id.startswith("new-")]
    assert [item[0] for item in with_slots if not item.reserved] == kept[: 6 - len(flagged)]


# ----- command line and HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, recommender) -> str:
    folder = tmp_path_factory.mktemp("diversity") / "model"
    recommender.save_pretrained(folder)
    return str(folder)


def test_cli_diversity_flag(capsys, model_folder):
    saved = Recommender.from_pretrained(model_folder)
    assert main(["recommend", model_folder, "--history", *HISTORY, "-k", "5", "--diversity", "1", "--json"]) == 0
    printed = [(record["item_id"], record["score"]) for record in json.loads(capsys.readouterr().out)]
    expected = saved.recommend(HISTORY, k=5, diversity=1.0)
    assert [item for item, _ in printed] == [item for item, _ in expected] != [item for item, _ in saved.recommend(HISTORY, k=5)]
    assert [score for _, score in printed] == pytest.approx([score for _, score in expected], rel=1e-6)
    for bad in ("2", "nan", "-0.5", "lots"):
        assert main(["recommend", model_folder, "--history", *HISTORY, "--diversity", bad]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: ") and len(captured.err.splitlines()) == 1
        assert "--diversity" in captured.err and "from 0 to 1" in captured.err and repr(bad) in captured.err


def test_http_diversity_field(recommender):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from llmrec.server import ServeSettings
    from llmrec.server.app import create_app

    expected = [item for item, _ in recommender.recommend(HISTORY, k=5, diversity=1.0)]
    with TestClient(create_app(recommender, ServeSettings(batch_wait_ms=1))) as client:  # micro-batched /recommend
        answer = client.post("/recommend", json={"history": HISTORY, "k": 5, "diversity": 1.0})
        assert answer.status_code == 200, answer.text
        assert [item["item_id"] for item in answer.json()["items"]] == expected
        assert client.post("/recommend", json={"history": HISTORY, "k": 5, "diversity": 1}).json() == answer.json()
        plain = client.post("/recommend", json={"history": HISTORY, "k": 5}).json()
        assert plain == client.post("/recommend", json={"history": HISTORY, "k": 5, "diversity": 0}).json() != answer.json()
        batch = client.post("/recommend/batch", json={"histories": [HISTORY], "k": 5, "diversity": 1.0})
        assert [item["item_id"] for item in batch.json()["results"][0]] == expected
        for bad in ("2", "-0.1", "true", '"0.5"', "NaN", "Infinity", "[0.5]"):
            for path, body in (("/recommend", f'{{"history": ["i1"], "diversity": {bad}}}'),
                               ("/recommend/batch", f'{{"histories": [["i1"]], "diversity": {bad}}}')):
                response = client.post(path, content=body, headers={"content-type": "application/json"})
                assert response.status_code == 422, (path, bad, response.text)
                assert "diversity" in response.json()["detail"], (path, bad)
