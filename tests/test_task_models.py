"""One class per mode: `LlmRecModel` infers; `LlmRecForRetrieval` and `LlmRecForReranking` train over its weights."""

from __future__ import annotations

import pytest
import torch

from llmrec.modeling import IGNORE_INDEX, LlmRecForReranking, LlmRecForRetrieval, LlmRecModel, pad_histories
from test_modeling import tiny_model

NUM_ITEMS = 20


def _model() -> LlmRecModel:
    model = tiny_model(NUM_ITEMS, max_history_length=6, warm_items=NUM_ITEMS)
    with torch.no_grad():
        model.reranker.scorer[-1].weight.normal_()  # a head that does not add exactly zero
    return model


def _histories() -> torch.Tensor:
    return pad_histories([[1, 2, 3], [4, 5], [9]], 6)


def _targets(histories: torch.Tensor) -> torch.Tensor:
    return torch.where(histories > 0, (histories % NUM_ITEMS) + 1, torch.full_like(histories, IGNORE_INDEX))


def test_the_base_model_infers_catalogue_scores_and_refuses_training_inputs():
    model = _model()
    histories = _histories()
    with torch.no_grad():
        output = model(histories)
        item_embeddings = model.item_embeddings()
        expected_users = model.encode_users(histories, item_embeddings)[:, -1]
    torch.testing.assert_close(output.user_embeddings, expected_users)
    torch.testing.assert_close(output.logits, model.similarity(expected_users, item_embeddings))
    assert output.loss is None
    with pytest.raises(TypeError, match="LlmRecForRetrieval.*LlmRecForReranking"):
        model(histories, target_item_indices=_targets(histories))


def test_wrapping_shares_the_weights_and_draws_nothing_from_the_random_stream():
    model = _model()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rng = torch.get_rng_state()
    retrieval, reranking = LlmRecForRetrieval(model), LlmRecForReranking(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert retrieval.llmrec is model and reranking.llmrec is model
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    # The task's parameters are the model's, under the base-model prefix transformers uses.
    assert {name.removeprefix("llmrec.") for name, _ in reranking.named_parameters()} == {
        name for name, _ in model.named_parameters()
    }
    # A step through the reranking task moves the shared head.
    histories = _histories()
    loss = reranking(histories, torch.tensor([[4, 5, 6], [1, 7, 8], [2, 3, 10]]), torch.tensor([0, 1, 2])).loss
    loss.backward()
    assert model.reranker.scorer[-1].weight.grad is not None


def test_each_task_has_one_loss():
    model = _model()
    histories = _histories()
    targets = _targets(histories)
    every_item = torch.arange(1, NUM_ITEMS + 1)
    with torch.no_grad():
        full = LlmRecForRetrieval(model)(histories, targets)
        sampled = LlmRecForRetrieval(model, loss="sampled_softmax")(histories, targets, every_item, torch.zeros(NUM_ITEMS))
        candidates = torch.tensor([[4, 5, 0], [1, 7, 8], [2, 3, 10]])
        reranked = LlmRecForReranking(model)(histories, candidates, torch.tensor([0, 1, IGNORE_INDEX]))
        expected_scores, _ = model.score_candidates(histories, candidates, model.item_embeddings())
    assert full.logits.shape == (3, NUM_ITEMS + 1) and sampled.logits is None
    torch.testing.assert_close(full.loss, sampled.loss)  # every item sampled, no correction: the same softmax
    torch.testing.assert_close(reranked.logits, expected_scores)
    expected_loss = torch.nn.functional.cross_entropy(expected_scores[:2], torch.tensor([0, 1]))
    torch.testing.assert_close(reranked.loss, expected_loss)
    assert reranked.logits[0, 2] == float("-inf")  # a padding candidate


def test_a_task_refuses_the_other_loss_s_inputs():
    model = _model()
    histories = _histories()
    with pytest.raises(ValueError, match="loss must be one of"):
        LlmRecForRetrieval(model, loss="bpr")
    with pytest.raises(ValueError, match="trains with full_softmax: do not pass sampled_item_indices"):
        LlmRecForRetrieval(model)(histories, _targets(histories), torch.arange(1, 5), torch.zeros(4))
    with pytest.raises(ValueError, match="trains with sampled_softmax: pass sampled_item_indices"):
        LlmRecForRetrieval(model, loss="sampled_softmax")(histories, _targets(histories))


def test_a_task_model_saves_and_loads_the_llmrec_model_folder(tmp_path):
    model = _model()
    LlmRecForReranking(model).save_pretrained(tmp_path)
    plain = LlmRecModel.from_pretrained(tmp_path).eval()
    reranking = LlmRecForReranking.from_pretrained(tmp_path).eval()
    retrieval = LlmRecForRetrieval.from_pretrained(tmp_path, loss="sampled_softmax")
    assert isinstance(reranking.llmrec, LlmRecModel) and retrieval.retrieval_loss == "sampled_softmax"
    histories = _histories()
    candidates = torch.tensor([[4, 5, 6], [1, 7, 8], [2, 3, 10]])
    with torch.no_grad():
        expected = LlmRecForReranking(model)(histories, candidates).logits
        torch.testing.assert_close(reranking(histories, candidates).logits, expected)
        torch.testing.assert_close(plain(histories).logits, model(histories).logits)


def test_a_task_built_from_a_config_builds_its_model():
    task = LlmRecForReranking(_model().config)
    assert isinstance(task.llmrec, LlmRecModel)
    assert task.llmrec.config.num_items == NUM_ITEMS
