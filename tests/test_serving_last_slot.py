"""Serving's user vectors: the last block computed at the read slot only, and length-sorted chunks padded to
their own longest, give the same vectors as the full pass over the whole padded batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig

from llmrec.modeling import LlmRecConfig, LlmRecModel, pad_histories, split_histories
from llmrec.retrieval import CandidatePipeline, build_item_index

NUM_ITEMS = 40
WINDOW = 16
TOLERANCE = 1e-5


def _model(user_num_layers: int = 2, **flags) -> LlmRecModel:
    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = LlmRecConfig(
        encoder_config=encoder.to_dict(), num_items=NUM_ITEMS, hidden_size=16, max_history_length=WINDOW,
        user_num_layers=user_num_layers, user_num_heads=2, rerank_num_heads=2, dropout=0.0, use_id_embeddings=True, **flags,
    )
    model = LlmRecModel(config)
    with torch.no_grad():
        model.item_text_embeddings[1:].normal_()
        model.user_encoder.position_embeddings.weight.normal_()
        if model.user_encoder.summary_projection is not None:
            model.user_encoder.summary_projection.weight.normal_()
    model.warm_items[1:] = True
    return model.eval()


def _histories(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, NUM_ITEMS + 1, size=length).tolist() for length in lengths]


def _last_states(model: LlmRecModel, histories, last_only: bool, **kwargs) -> torch.Tensor:
    window, older = split_histories(histories, WINDOW, None)
    with torch.inference_mode():
        states = model.encode_users(window, model.item_embeddings(), older_item_indices=older, last_only=last_only, **kwargs)
    if last_only:
        assert states.shape[1] == 1
    return states[:, -1]


@pytest.mark.parametrize(
    ("flags", "layers"), [({}, 2), ({}, 1), ({}, 0), ({"history_summary": True}, 2), ({"use_user_profiles": True}, 2)]
)
@pytest.mark.parametrize("lengths", [[7], [WINDOW, WINDOW], [1, 3, WINDOW, 9, WINDOW + 5, 2 * WINDOW + 1]])
def test_last_only_equals_the_full_pass(flags, layers, lengths):
    model = _model(layers, **flags)
    histories = _histories(lengths)
    kwargs = {}
    if flags.get("use_user_profiles"):
        kwargs = {"profile_text_embeddings": torch.randn(len(histories), model.config.encoder_config["hidden_size"]),
                  "has_profile": torch.tensor([row % 2 == 0 for row in range(len(histories))])}
    full, last = _last_states(model, histories, False, **kwargs), _last_states(model, histories, True, **kwargs)
    assert torch.allclose(full, last, atol=TOLERANCE)


def test_last_only_reads_the_profile_token_of_a_user_without_history():
    model = _model(2, use_user_profiles=True)
    empty = torch.zeros(3, 4, dtype=torch.long)
    empty[2, -2:] = torch.tensor([5, 6])  # a mixed batch: two cold users and one with a history
    profiles = torch.randn(3, model.config.encoder_config["hidden_size"])
    with torch.inference_mode():
        items = model.item_embeddings()
        full = model.encode_users(empty, items, profiles)[:, -1]
        last = model.encode_users(empty, items, profiles, last_only=True)[:, -1]
    assert torch.allclose(full, last, atol=TOLERANCE)


@pytest.mark.parametrize("flags", [{}, {"history_summary": True}])
def test_chunked_serving_embeddings_equal_one_padded_batch(flags):
    model = _model(2, **flags)
    pipeline = CandidatePipeline(model, build_item_index(model), num_candidates=10)
    rng = np.random.default_rng(1)
    histories = _histories(rng.choice([0, 1, 2, 5, WINDOW, WINDOW + 3, 3 * WINDOW], size=50).tolist())
    window, older = split_histories(histories, WINDOW, None)
    with torch.inference_mode():
        reference = model.encode_users(window, pipeline.item_embeddings, older_item_indices=older)[:, -1]
    chunked = pipeline.user_embeddings(histories, chunk_size=7)
    assert window.shape[1] == WINDOW and pad_histories(histories[:1], WINDOW).shape[1] <= WINDOW
    assert torch.allclose(reference, chunked, atol=TOLERANCE)
    assert torch.allclose(pipeline.user_embeddings(histories), chunked, atol=TOLERANCE)


def test_chunked_head_scores_equal_one_padded_batch():
    model = _model(2)
    pipeline = CandidatePipeline(model, build_item_index(model), num_candidates=10)
    rng = np.random.default_rng(2)
    histories = _histories(rng.choice([1, 2, 5, 9, WINDOW, 2 * WINDOW], size=150).tolist())
    candidates = torch.as_tensor(rng.integers(0, NUM_ITEMS + 1, size=(len(histories), 6)))
    window, older = split_histories(histories, WINDOW, None)
    with torch.inference_mode():
        reference, _ = model.score_candidates(window, candidates, pipeline.item_embeddings, rerank_cache=pipeline.rerank_cache,
                                              older_item_indices=older)
    chunked, attentions = pipeline.rerank(histories, candidates)
    assert attentions is None and chunked.shape == reference.shape
    assert torch.equal(torch.isinf(reference), torch.isinf(chunked))
    finite = torch.isfinite(reference)
    assert torch.allclose(reference[finite], chunked[finite], atol=TOLERANCE)


def test_id_mapping_fast_path_keeps_the_checks():
    from types import SimpleNamespace

    from llmrec.errors import InvalidRequestError, UnknownItemError
    from llmrec.serving import item_indices

    state = SimpleNamespace(item_index={"1": 1, "2": 2, "True": 3})
    assert item_indices(state, ["2", "1", "2"], "history") == [2, 1, 2]
    assert item_indices(state, [np.str_("2"), 1, np.int64(2)], "history") == [2, 1, 2]
    with pytest.raises(UnknownItemError, match="'9'"):
        item_indices(state, ["1", "9"], "history")
    for bad in ([True], [None], [1.0], [["1"]]):
        with pytest.raises(InvalidRequestError):
            item_indices(state, bad, "history")
