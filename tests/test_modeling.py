"""The model's masking, attention paths, losses and Hugging Face save/load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, BertConfig

from llmrec.modeling import (
    IGNORE_INDEX, LlmRecConfig, LlmRecForReranking, LlmRecForRetrieval, LlmRecModel, pad_histories,
)

NUM_ITEMS = 30


def tiny_model(num_items: int = NUM_ITEMS, max_history_length: int = 12, warm_items: int = 19) -> LlmRecModel:
    """A seeded model over a one-layer BERT, with random cached item texts; items 1..warm_items are warm."""
    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = LlmRecConfig(
        encoder_config=encoder.to_dict(), num_items=num_items, hidden_size=16, max_history_length=max_history_length,
        user_num_heads=2, rerank_num_heads=4, dropout=0.0,
    )
    model = LlmRecModel(config)
    with torch.no_grad():
        model.item_text_embeddings[1:].normal_()
    model.warm_items[1 : warm_items + 1] = True
    return model.eval()


@pytest.fixture()
def model() -> LlmRecModel:
    return tiny_model()


def test_pad_histories_left_pads_and_keeps_most_recent():
    padded = pad_histories([[1, 2, 3, 4, 5], [7], []], max_length=3)
    assert padded.tolist() == [[3, 4, 5], [0, 0, 7], [0, 0, 0]]


def test_extra_padding_never_changes_scores(model):
    history = [3, 8, 1, 9]
    candidates = torch.tensor([[2, 5, 11, 25]])
    short = pad_histories([history], 12)
    long = torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1)  # same history, 6 more padding slots
    item_embeddings = model.item_embeddings()
    short_user = model.encode_users(short, item_embeddings)[:, -1]
    long_user = model.encode_users(long, item_embeddings)[:, -1]
    torch.testing.assert_close(short_user, long_user, atol=1e-5, rtol=1e-5)
    short_scores, _ = model.score_candidates(short, candidates, item_embeddings)
    long_scores, _ = model.score_candidates(long, candidates, item_embeddings)
    torch.testing.assert_close(short_scores, long_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("output_attentions", [False, True], ids=["sdpa", "explicit-weights"])
def test_fully_padded_history_gives_finite_scores_and_gradients(model, output_attentions):
    model.train()
    history = torch.zeros(2, 5, dtype=torch.long)
    history[1, -2:] = torch.tensor([4, 6])
    output = LlmRecForReranking(model)(
        history,
        candidate_item_indices=torch.tensor([[1, 2, 3], [4, 5, 6]]),
        candidate_labels=torch.tensor([0, 2]),
        output_attentions=output_attentions,
    )
    assert torch.isfinite(output.logits).all()
    if output_attentions:
        assert output.attentions[0].abs().sum() == 0  # an empty history attends to nothing
    output.loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name


def test_padding_candidates_score_minus_infinity(model):
    scores, _ = model.score_candidates(pad_histories([[1, 2]], 12), torch.tensor([[3, 0, 4]]), model.item_embeddings())
    assert scores[0, 1] == float("-inf") and torch.isfinite(scores[0, [0, 2]]).all()


def test_attention_weights_match_sdpa_path_and_sum_to_one(model):
    history = pad_histories([[3, 8, 1], [5]], 12)
    candidates = torch.tensor([[2, 5, 11], [1, 2, 3]])
    item_embeddings = model.item_embeddings()
    fast, none = model.score_candidates(history, candidates, item_embeddings)
    explained, weights = model.score_candidates(history, candidates, item_embeddings, output_attentions=True)
    assert none is None
    torch.testing.assert_close(fast, explained, atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 4, 3, history.shape[1])  # (batch, heads, candidates, history slots)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 3))
    padding_slots = (history == 0)[:, None, None, :].expand_as(weights)
    assert weights[padding_slots].abs().max() == 0  # padding gets no attention


def test_user_states_are_causal(model):
    history = pad_histories([[3, 8, 1, 9]], 12)
    changed = history.clone()
    changed[0, -1] = 17  # only the last item differs
    item_embeddings = model.item_embeddings()
    states = model.encode_users(history, item_embeddings)
    changed_states = model.encode_users(changed, item_embeddings)
    torch.testing.assert_close(states[:, :-1], changed_states[:, :-1])
    assert not torch.allclose(states[:, -1], changed_states[:, -1])


def test_cold_items_have_no_id_embedding(model):
    with torch.no_grad():
        model.item_id_embeddings.weight.fill_(1.0)
    embeddings = model.item_embeddings()
    text_only = model.text_projection(model.item_text_embeddings)
    torch.testing.assert_close(embeddings[25], text_only[25])  # cold (not warm)
    assert not torch.allclose(embeddings[5], text_only[5])  # warm
    assert embeddings[0].abs().sum() == 0  # padding row


def test_full_and_sampled_softmax_losses(model):
    history = pad_histories([[1, 2, 3], [4, 5]], 12)
    targets = torch.full_like(history, IGNORE_INDEX)
    targets[0, -3:] = torch.tensor([2, 3, 7])
    targets[1, -2:] = torch.tensor([5, 9])
    full = LlmRecForRetrieval(model)(history, target_item_indices=targets).loss
    assert torch.isfinite(full) and full > 0
    # With every item sampled and no correction, the sampled softmax equals the full one.
    every_item = torch.arange(1, NUM_ITEMS + 1)
    sampled_output = LlmRecForRetrieval(model, loss="sampled_softmax")(
        history, target_item_indices=targets, sampled_item_indices=every_item, sampled_log_q=torch.zeros(NUM_ITEMS)
    )
    torch.testing.assert_close(full, sampled_output.loss)
    assert sampled_output.logits is None  # no full-catalogue scores on the sampled path


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llmrec"
    loaded = LlmRecModel.from_pretrained(tmp_path).eval()
    assert isinstance(AutoModel.from_pretrained(tmp_path), LlmRecModel)  # registered with the Auto classes
    history = pad_histories([[3, 8, 1]], 12)
    candidates = torch.tensor([[2, 5, 11]])
    torch.testing.assert_close(loaded.item_text_embeddings, model.item_text_embeddings)
    torch.testing.assert_close(loaded.warm_items, model.warm_items)
    torch.testing.assert_close(
        loaded.score_candidates(history, candidates, loaded.item_embeddings())[0],
        model.score_candidates(history, candidates, model.item_embeddings())[0],
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pooling": "max"}, "pooling"),
        ({"hidden_size": 10, "user_num_heads": 4}, "divisible"),
        ({"similarity_temperature": 0.0}, "similarity_temperature"),
    ],
)
def test_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlmRecConfig(**kwargs)


def test_logq_correction_uses_inclusion_probability():
    from llmrec.training.trainer import log_inclusion_probability

    probabilities = torch.tensor([1e-6, 0.01, 0.5], dtype=torch.float64)
    log_q = log_inclusion_probability(probabilities, num_samples=100)
    torch.testing.assert_close(log_q[0], torch.log(torch.tensor(100 * 1e-6, dtype=torch.float64)), rtol=1e-3, atol=0)
    torch.testing.assert_close(log_q[1], torch.log(torch.tensor(1 - 0.99**100, dtype=torch.float64)))
    assert abs(log_q[2]) < 1e-12  # drawn almost surely: no correction
