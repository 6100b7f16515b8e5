"""`model.impute_missing_ids`: an item without a trained ID embedding gets one predicted from its text."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from llmrec.config import ModelSettings
from llmrec.errors import ConfigError
from llmrec.modeling import LlmRecConfig, LlmRecModel

NUM_ITEMS, WARM = 12, 8


def _model(impute: bool = True, id_dropout: float = 0.5) -> LlmRecModel:
    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = LlmRecConfig(encoder_config=encoder.to_dict(), num_items=NUM_ITEMS, hidden_size=16, user_num_heads=2,
                          rerank_num_heads=2, dropout=0.0, id_dropout=id_dropout, impute_missing_ids=impute)
    model = LlmRecModel(config)
    with torch.no_grad():
        model.item_text_embeddings[1:].normal_()
        model.item_id_embeddings.weight[1:].normal_()
    model.warm_items[1 : WARM + 1] = True
    return model.eval()


def _set_imputer(model: LlmRecModel) -> None:
    with torch.no_grad():
        model.id_imputer.weight.normal_()
        model.id_imputer.bias.normal_()


def test_default_model_has_no_imputer_and_the_state_dict_of_earlier_releases():
    model = _model(impute=False)
    assert model.id_imputer is None
    assert not any(name.startswith("id_imputer") for name in model.state_dict())


def test_untrained_imputer_leaves_every_vector_as_without_it():
    with_imputer, without = _model(impute=True), _model(impute=False)
    torch.testing.assert_close(with_imputer.item_embeddings(), without.item_embeddings())


def test_cold_items_get_text_plus_predicted_id_and_warm_items_keep_their_own():
    model = _model()
    _set_imputer(model)
    text = model.text_projection(model.item_text_embeddings)
    vectors = model.item_embeddings()
    cold = torch.arange(WARM + 1, NUM_ITEMS + 1)
    torch.testing.assert_close(vectors[cold], text[cold] + model.id_imputer(text[cold]))
    warm = torch.arange(1, WARM + 1)
    torch.testing.assert_close(vectors[warm], text[warm] + model.item_id_embeddings.weight[warm])
    assert torch.count_nonzero(vectors[0]) == 0  # padding stays zero
    torch.testing.assert_close(model.item_embeddings(rows=cold), vectors[cold])


def test_dropped_ids_train_the_imputer():
    model = _model(id_dropout=0.9).train()
    torch.manual_seed(1)
    model.item_embeddings(rows=torch.arange(1, WARM + 1)).sum().backward()
    assert model.id_imputer.weight.grad is not None and model.id_imputer.weight.grad.abs().sum() > 0
    # With no dropout a warm item always has its own ID, so nothing reaches the imputer from warm rows.
    model = _model(id_dropout=0.9).eval()
    model.item_embeddings(rows=torch.arange(1, WARM + 1)).sum().backward()
    assert model.id_imputer.weight.grad.abs().sum() == 0


def test_added_items_get_the_imputed_id_and_the_folder_round_trips(tmp_path):
    model = _model()
    _set_imputer(model)
    new_text = torch.randn(2, model.item_encoder.output_size)
    model.add_items(new_text)
    new_rows = torch.tensor([NUM_ITEMS + 1, NUM_ITEMS + 2])
    projected = model.text_projection(new_text)
    torch.testing.assert_close(model.item_embeddings(rows=new_rows), projected + model.id_imputer(projected))
    model.save_pretrained(tmp_path)
    loaded = LlmRecModel.from_pretrained(tmp_path).eval()
    assert loaded.config.impute_missing_ids is True
    torch.testing.assert_close(loaded.item_embeddings(), model.item_embeddings())


@pytest.mark.parametrize("overrides, named", [
    ({"use_id_embeddings": False}, "use_id_embeddings"),
    ({"use_text_embeddings": False}, "use_text_embeddings"),
    ({"id_dropout": 0.0}, "id_dropout"),
])
def test_imputation_without_both_paths_or_dropped_ids_is_refused(overrides, named):
    with pytest.raises(ConfigError, match=f"impute_missing_ids.*{named}"):
        ModelSettings(impute_missing_ids=True, **overrides).validate()
