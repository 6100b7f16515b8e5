"""The head's own features: `model.rerank_text_similarity` (the encoder's candidate-history text similarity) and
`model.rerank_popularity` (each candidate's training popularity)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from llmrec.errors import ConfigError
from llmrec.modeling import LlmRecConfig, LlmRecForReranking, LlmRecModel, pad_histories
from llmrec.modeling.reranker import text_similarity_features
from llmrec.retrieval import CandidatePipeline, build_item_index

NUM_ITEMS = 30


def _model(text_similarity: bool, popularity: bool = False) -> LlmRecModel:
    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = LlmRecConfig(
        encoder_config=encoder.to_dict(), num_items=NUM_ITEMS, hidden_size=16, max_history_length=8,
        user_num_heads=2, rerank_num_heads=2, dropout=0.0, rerank_text_similarity=text_similarity,
        rerank_popularity=popularity,
    )
    model = LlmRecModel(config)
    with torch.no_grad():
        model.item_text_embeddings[1:].normal_()
    model.warm_items[1:] = True
    model.set_item_popularity(torch.arange(NUM_ITEMS + 1) % 7)
    return model.eval()


def test_features_on_a_hand_made_example():
    x, y, diagonal = [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]
    candidates = torch.tensor([[x, diagonal]])  # (1, 2, 2)
    history = torch.tensor([[[5.0, 5.0], x, y]])  # left-padded: slot 0 is padding (its vector must not count)
    mask = torch.tensor([[False, True, True]])
    features = text_similarity_features(candidates, history, mask)
    half = 2 ** -0.5
    expected = torch.tensor([[[1.0, 0.5, 0.0], [half, half, half]]])  # max, mean, most recent (y)
    torch.testing.assert_close(features, expected)
    empty = text_similarity_features(candidates, history, torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(1, 2, 3))


def test_the_scores_depend_on_the_text_similarity():
    model = _model(text_similarity=True)
    with torch.no_grad():  # the head starts as retrieval (its last layer is zero); give it some weights
        for parameter in [*model.reranker.scorer.parameters(), model.reranker.text_similarity_weight]:
            parameter.normal_()
    history, candidates = pad_histories([[3, 4, 5]], 8), torch.tensor([[6, 7]])
    item_embeddings = model.item_embeddings()
    before, _ = model.score_candidates(history, candidates, item_embeddings)
    with torch.no_grad():
        model.item_text_embeddings[6] = model.item_text_embeddings[5]  # candidate 6 now reads as the latest item
    after, _ = model.score_candidates(history, candidates, item_embeddings)  # same projected vectors
    assert not torch.allclose(before[0, 0], after[0, 0]) and torch.allclose(before[0, 1], after[0, 1])
    assert model.reranker.text_similarity_weight.shape == (16, 3)
    assert _model(text_similarity=False).reranker.text_similarity_weight is None


def test_switching_the_features_on_changes_no_other_weight_nor_the_random_stream():
    """So a run with the features trains the very same stage 1 as one without."""
    models, next_draws = [], []
    for text_similarity in (False, True):
        models.append(_model(text_similarity))
        next_draws.append(torch.rand(3))
    without, with_features = (model.state_dict() for model in models)
    assert set(with_features) - set(without) == {"reranker.text_similarity_weight"}
    assert all(torch.equal(without[name], with_features[name]) for name in without)
    assert torch.equal(*next_draws)
    assert not with_features["reranker.text_similarity_weight"].any()


def test_training_forward_and_serving_give_the_same_scores():
    """Training scores rows of a table of just the batch's items; serving scores item indices."""
    model = _model(text_similarity=True)
    histories = [[3, 9, 12, 4], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    candidates = torch.tensor([[5, 6, 20, 0], [8, 9, 10, 11], [29, 30, 1, 2]])
    window = pad_histories(histories, 8)
    output = LlmRecForReranking(model)(window, candidate_item_indices=candidates, candidate_labels=torch.tensor([0, 1, 2]))
    pipeline = CandidatePipeline(model, build_item_index(model), num_candidates=4)
    served, _ = pipeline.rerank([history[-8:] for history in histories], candidates)
    torch.testing.assert_close(output.logits, served, atol=1e-5, rtol=1e-5)


def test_an_id_only_model_cannot_read_text_similarity():
    with pytest.raises(ConfigError, match="rerank_text_similarity needs item texts"):
        LlmRecConfig(num_items=5, use_text_embeddings=False, rerank_text_similarity=True)


def test_save_and_load_keep_the_setting(tmp_path):
    model = _model(text_similarity=True)
    model.save_pretrained(tmp_path)
    loaded = LlmRecModel.from_pretrained(tmp_path).eval()
    history, candidates = pad_histories([[3, 4]], 8), torch.tensor([[6, 7, 8]])
    assert loaded.config.rerank_text_similarity
    torch.testing.assert_close(
        loaded.score_candidates(history, candidates, loaded.item_embeddings())[0],
        model.score_candidates(history, candidates, model.item_embeddings())[0],
    )


def test_popularity_feature_on_a_hand_made_example():
    model = _model(text_similarity=False, popularity=True)
    model.set_item_popularity(torch.tensor([5, 0, 1, 3, 7] + [0] * (NUM_ITEMS - 4)))
    third = 1 / 3  # log 2 / log 8
    torch.testing.assert_close(model.item_popularity_feature[:5], torch.tensor([0.0, 0.0, third, 2 * third, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        model.set_item_popularity(torch.ones(3))


def test_the_scores_depend_on_the_popularity_of_each_candidate_alone():
    model = _model(text_similarity=False, popularity=True)
    with torch.no_grad():
        for parameter in [*model.reranker.scorer.parameters(), model.reranker.popularity_weight]:
            parameter.normal_()
    history, candidates = pad_histories([[3, 4, 5]], 8), torch.tensor([[6, 7]])
    item_embeddings = model.item_embeddings()
    before, _ = model.score_candidates(history, candidates, item_embeddings)
    with torch.no_grad():
        model.item_popularity_feature[6] += 0.5
    after, _ = model.score_candidates(history, candidates, item_embeddings)
    assert not torch.allclose(before[0, 0], after[0, 0]) and torch.allclose(before[0, 1], after[0, 1])


def test_switching_popularity_on_adds_its_weight_and_table_only():
    without, with_popularity = _model(text_similarity=True), _model(text_similarity=True, popularity=True)
    added = set(with_popularity.state_dict()) - set(without.state_dict())
    assert added == {"reranker.popularity_weight", "item_popularity_feature"}
    assert all(torch.equal(tensor, with_popularity.state_dict()[name]) for name, tensor in without.state_dict().items())
    assert not with_popularity.reranker.popularity_weight.any()


def test_popularity_in_training_forward_and_serving_gives_the_same_scores_and_grows_with_the_catalogue(tmp_path):
    model = _model(text_similarity=True, popularity=True)
    with torch.no_grad():
        model.reranker.popularity_weight.normal_()
        model.reranker.scorer[-1].weight.normal_()
    histories = [[3, 9, 12, 4], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    candidates = torch.tensor([[5, 6, 20, 0], [8, 9, 10, 11], [29, 30, 1, 2]])
    output = LlmRecForReranking(model)(
        pad_histories(histories, 8), candidate_item_indices=candidates, candidate_labels=torch.tensor([0, 1, 2])
    )
    served, _ = CandidatePipeline(model, build_item_index(model), num_candidates=4).rerank(histories, candidates)
    torch.testing.assert_close(output.logits, served, atol=1e-5, rtol=1e-5)
    model.add_items(torch.randn(2, model.item_text_embeddings.shape[1]))
    assert model.item_popularity_feature.shape == (NUM_ITEMS + 3,) and not model.item_popularity_feature[-2:].any()
    model.save_pretrained(tmp_path)
    loaded = LlmRecModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.item_popularity_feature, model.item_popularity_feature)
    torch.testing.assert_close(loaded.score_candidates(pad_histories([[3]], 8), torch.tensor([[31, 6]]), loaded.item_embeddings())[0],
                               model.score_candidates(pad_histories([[3]], 8), torch.tensor([[31, 6]]), model.item_embeddings())[0])


def test_a_trained_folder_carries_the_training_counts_and_serves_new_items(planted_data_dir, tiny_encoder_dir, tmp_path):
    from llmrec import Recommender
    from llmrec.config import load_config
    from llmrec.training import run_finetune
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "run")
    overrides["training"].update(retrieval_epochs=1, rerank_epochs=1)
    overrides.setdefault("model", {})["rerank_popularity"] = True
    run_finetune(load_config(overrides=overrides))
    recommender = Recommender.from_pretrained(tmp_path / "run")
    counts = torch.tensor(recommender.item_popularity, dtype=torch.float32)
    expected = torch.log1p(counts) / torch.log1p(counts.max())
    torch.testing.assert_close(recommender.model.item_popularity_feature[1:], expected)
    assert recommender.model.config.rerank_popularity
    recommender.add_items(["new-a"], ["movie number 5 genre g1"])
    assert recommender.model.item_popularity_feature[-1] == 0
    assert len(recommender.recommend(["i0", "i1"], k=5)) == 5
