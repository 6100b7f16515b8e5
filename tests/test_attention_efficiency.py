"""Issue 7's optimisations keep the model's outputs: SDPA vs plain attention, the rerank cache, the
history summary, row-wise item projection, gradient checkpointing and reduced precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig

from llmrec.modeling import (
    LlmRecConfig, LlmRecForReranking, LlmRecForRetrieval, LlmRecModel, pad_histories, split_histories,
)
from llmrec.modeling.task_models import encode_texts_by_length
from llmrec.modeling.precision import autocast, check_precision, check_quantize, quantize_int8
from llmrec.modeling.text_encoding import embed_tokenized_items
from llmrec.retrieval import CandidatePipeline, build_item_index
from llmrec.training.examples import collate_next_item, next_item_windows

NUM_ITEMS = 40
WINDOW = 8


def build_model(**overrides) -> LlmRecModel:
    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    settings = dict(
        encoder_config=encoder.to_dict(), num_items=NUM_ITEMS, hidden_size=16, max_history_length=WINDOW,
        user_num_heads=2, rerank_num_heads=4, dropout=0.0,
    )
    model = LlmRecModel(LlmRecConfig(**{**settings, **overrides}))
    with torch.no_grad():
        model.item_text_embeddings[1:].normal_()
        for parameter in model.reranker.parameters():  # a trained-looking head, not the zero-initialised one
            parameter.normal_(std=0.3)
    model.warm_items[1:30] = True
    return model.eval()


@pytest.fixture()
def model() -> LlmRecModel:
    return build_model()


def random_histories(count: int, max_length: int, seed: int = 0) -> list[list[int]]:
    generator = np.random.default_rng(seed)
    return [generator.integers(1, NUM_ITEMS + 1, size=generator.integers(1, max_length + 1)).tolist() for _ in range(count)]


# ----- SDPA and the plain reference -----------------------------------------------------------------


@pytest.mark.parametrize("full_histories", [False, True], ids=["padded (boolean mask)", "unpadded (no mask, is_causal)"])
def test_sdpa_and_plain_attention_agree(model, full_histories):
    histories = [list(range(1, WINDOW + 1)), list(range(9, 9 + WINDOW))] if full_histories else random_histories(6, WINDOW)
    padded = pad_histories(histories, WINDOW)
    assert bool((padded > 0).all()) == full_histories
    candidates = torch.randint(1, NUM_ITEMS + 1, (len(histories), 7))
    with torch.no_grad():
        item_embeddings = model.item_embeddings()
        model.config._attn_implementation = "sdpa"
        users_sdpa = model.encode_users(padded, item_embeddings)
        scores_sdpa, _ = model.score_candidates(padded, candidates, item_embeddings)
        model.config._attn_implementation = "eager"
        users_plain = model.encode_users(padded, item_embeddings)
        scores_plain, _ = model.score_candidates(padded, candidates, item_embeddings)
    torch.testing.assert_close(users_sdpa, users_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores_sdpa, scores_plain, atol=1e-4, rtol=1e-5)


def test_unpadded_fast_path_matches_the_masked_path(model):
    """A full-window history alone (is_causal, no mask) scores as it does inside a padded batch (explicit mask)."""
    full = list(range(3, 3 + WINDOW))
    candidates = torch.tensor([[1, 2, 30, 40]])
    with torch.no_grad():
        item_embeddings = model.item_embeddings()
        alone, _ = model.score_candidates(pad_histories([full], WINDOW), candidates, item_embeddings)
        batch = pad_histories([full, [5]], WINDOW)
        in_batch, _ = model.score_candidates(batch, candidates.repeat(2, 1), item_embeddings)
    torch.testing.assert_close(alone[0], in_batch[0], atol=1e-5, rtol=1e-5)


# ----- serving cache --------------------------------------------------------------------------------


def test_rerank_cache_gives_the_uncached_scores(model):
    pipeline = CandidatePipeline(model, build_item_index(model), num_candidates=10)
    histories = random_histories(5, 3 * WINDOW, seed=1)
    candidates = np.random.default_rng(2).integers(0, NUM_ITEMS + 1, size=(5, 9))
    cached, _ = pipeline.rerank(histories, candidates)
    uncached, _ = pipeline.rerank(histories, candidates, use_cache=False)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    assert torch.isinf(cached[torch.as_tensor(candidates) == 0]).all()


def test_adding_items_extends_the_cache_to_what_a_rebuild_gives(model):
    original = CandidatePipeline(model, build_item_index(model), num_candidates=10)
    model.add_items(torch.randn(3, model.item_encoder.output_size))
    pipeline = original.extended(3)
    assert (pipeline.index.num_items, pipeline.num_items) == (NUM_ITEMS + 3, NUM_ITEMS + 3)
    assert (original.index.num_items, original.num_items) == (NUM_ITEMS, NUM_ITEMS)  # left as it was, for running requests
    extended = (pipeline.item_embeddings, pipeline.rerank_cache)
    pipeline.refresh()
    torch.testing.assert_close(extended[0], pipeline.item_embeddings)
    for name in ("item_queries", "item_keys", "item_values", "recency_keys", "recency_values"):
        torch.testing.assert_close(getattr(extended[1], name), getattr(pipeline.rerank_cache, name), atol=1e-6, rtol=1e-6)
    scores, _ = pipeline.rerank([[1, 2, 3]], np.array([[NUM_ITEMS + 1, NUM_ITEMS + 3]]))
    assert torch.isfinite(scores).all()


def test_item_embeddings_of_some_rows_equal_those_rows_of_the_table(model):
    rows = torch.tensor([0, 5, 31, 2, 40])  # padding, warm, cold, warm, cold
    with torch.no_grad():
        torch.testing.assert_close(model.item_embeddings(rows=rows), model.item_embeddings()[rows])


def test_training_steps_that_touch_few_items_give_the_full_table_losses():
    """Sampled softmax and reranking project only the batch's items; the losses are those of the full table."""
    model = build_model(history_summary=True)
    histories = random_histories(4, 2 * WINDOW, seed=4)
    window, older = split_histories(histories, WINDOW)
    targets = torch.where(window > 0, torch.randint(1, 30, window.shape), torch.full_like(window, -100))
    sampled = torch.unique(torch.cat([targets[targets > 0], torch.tensor([3, 7, 29, 35])]))
    log_q = torch.linspace(-3, -1, len(sampled))
    candidates = torch.randint(0, NUM_ITEMS + 1, (4, 6))
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        table = model.item_embeddings()
        states = model.encode_users(window, table, older_item_indices=older)
        expected_sampled = model._retrieval_loss(states, table[sampled], targets, sampled, log_q)
        expected_scores, _ = model.score_candidates(window, candidates, table, older_item_indices=older)
        sampled_softmax = LlmRecForRetrieval(model, loss="sampled_softmax")
        sampled_loss = sampled_softmax(window, targets, sampled, log_q, older_item_indices=older).loss
        rerank = LlmRecForReranking(model)(window, candidates, candidate_labels=labels, older_item_indices=older)
    torch.testing.assert_close(sampled_loss, expected_sampled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rerank.logits, expected_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rerank.loss, torch.nn.functional.cross_entropy(expected_scores, labels), atol=1e-5, rtol=1e-5)


# ----- long histories -------------------------------------------------------------------------------


def test_split_histories_keeps_the_window_and_the_older_items():
    window, older = split_histories([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]], max_length=3)
    assert window.tolist() == [[3, 4, 5], [0, 6, 7], [9, 10, 11]]
    assert older.tolist() == [[1, 2], [0, 0], [8, 0]]
    assert split_histories([[1, 2], [3]], max_length=3)[1] is None


def test_without_history_summary_older_items_are_ignored(model):
    history = list(range(1, 3 * WINDOW))
    window, older = split_histories([history], WINDOW)
    with torch.no_grad():
        item_embeddings = model.item_embeddings()
        torch.testing.assert_close(
            model.encode_users(window, item_embeddings, older_item_indices=older), model.encode_users(window, item_embeddings)
        )


def test_history_summary_reads_older_items_through_one_token():
    model = build_model(history_summary=True)
    recent = list(range(1, WINDOW + 1))
    lengths = []
    hook = model.user_encoder.blocks[0].attention.register_forward_hook(lambda module, inputs, output: lengths.append(inputs[0].shape[1]))
    users = []
    with torch.no_grad():
        item_embeddings = model.item_embeddings()
        for older_items in ([], [20, 21, 22], [30, 31, 32] * 300):
            window, older = split_histories([older_items + recent], WINDOW)
            users.append(model.encode_users(window, item_embeddings, older_item_indices=older)[0, -1])
    hook.remove()
    assert not torch.allclose(users[0], users[1]) and not torch.allclose(users[1], users[2])
    # Self-attention sees the window plus one summary token, however long the history: cost linear in length.
    assert lengths == [WINDOW, WINDOW + 1, WINDOW + 1]


def test_training_windows_carry_their_older_items_for_the_summary():
    sequence = list(range(1, 21))
    windows = next_item_windows([sequence], max_history_length=5, keep_older=True)
    short = next_item_windows([sequence], max_history_length=5)
    assert [window[-6:] for window in windows] == short  # same windows, each with its past
    batch = collate_next_item(windows, max_history_length=5)
    assert batch["history_item_indices"][0].tolist() == [15, 16, 17, 18, 19]
    assert batch["target_item_indices"][0].tolist() == [16, 17, 18, 19, 20]
    assert batch["older_item_indices"][0].tolist() == list(range(1, 15))
    assert "older_item_indices" not in collate_next_item(short, max_history_length=5)


def test_history_summary_model_round_trips(tmp_path):
    model = build_model(history_summary=True)
    model.save_pretrained(tmp_path)
    loaded = LlmRecModel.from_pretrained(tmp_path).eval()
    window, older = split_histories([list(range(1, 3 * WINDOW))], WINDOW)
    with torch.no_grad():
        expected = model.encode_users(window, model.item_embeddings(), older_item_indices=older)
        actual = loaded.encode_users(window, loaded.item_embeddings(), older_item_indices=older)
    torch.testing.assert_close(expected, actual)


# ----- training efficiency ----------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    histories = pad_histories(random_histories(4, WINDOW, seed=3), WINDOW)
    targets = torch.where(histories > 0, torch.randint(1, 30, histories.shape), torch.full_like(histories, -100))
    results = []
    for checkpointing in (False, True):
        model = build_model(history_summary=True).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.user_encoder.gradient_checkpointing
        loss = LlmRecForRetrieval(model)(histories, target_item_indices=targets).loss
        loss.backward()
        results.append((loss.detach(), model.user_encoder.blocks[0].attention.query.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)


# ----- precision -------------------------------------------------------------------------------------


def test_bf16_catalogue_encoding_stays_close_to_fp32(model):
    tokenized = {
        "input_ids": torch.randint(1, 50, (12, 10)),
        "attention_mask": torch.ones(12, 10, dtype=torch.long),
    }
    tokenized["attention_mask"][3, 6:] = 0
    fp32 = embed_tokenized_items(model, tokenized, batch_size=4, show_progress=False)
    bf16 = embed_tokenized_items(model, tokenized, batch_size=4, show_progress=False, precision="bf16")
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert not torch.equal(fp32, bf16)  # autocast did run
    cosine = torch.nn.functional.cosine_similarity(fp32[1:], bf16[1:], dim=-1)
    assert cosine.min() > 0.99


def test_int8_quantisation_keeps_embeddings_close_and_replaces_linear_layers(model):
    tokens = torch.randint(1, 50, (6, 10))
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        fp32 = model.encode_item_texts(tokens, mask)
        quantize_int8(model.item_encoder)
        int8 = model.encode_item_texts(tokens, mask)
    assert not any(type(module) is torch.nn.Linear for module in model.item_encoder.modules())
    assert torch.nn.functional.cosine_similarity(fp32, int8, dim=-1).min() > 0.9


def test_bad_precision_settings_are_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("fp8")
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        check_quantize("int4", torch.device("cpu"))
    with pytest.raises(ValueError, match="for CPU serving"):
        check_quantize("int8", torch.device("cuda"))
    assert check_quantize(None, torch.device("cuda")) is None
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_finetune_with_summary_checkpointing_bf16_and_hnsw_trains_and_serves(tmp_path, planted_data_dir, tiny_encoder_dir):
    """The options together through the real entry point: windows shorter than the histories, so summaries are
    read, and the saved model serves from an HNSW index."""
    from conftest import tiny_overrides

    from llmrec import Recommender
    from llmrec.config import load_config
    from llmrec.training import run_finetune

    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "run")
    overrides["model"].update(max_history_length=4, history_summary=True)
    overrides["training"].update(
        retrieval_epochs=3, rerank_epochs=1, gradient_checkpointing=True, mixed_precision="bf16"
    )
    overrides["retrieval"].update(index_type="hnsw", hnsw_m=8, hnsw_ef_search=40)
    from accelerate.state import AcceleratorState

    try:
        results = run_finetune(load_config(overrides=overrides))
    finally:  # Accelerate keeps mixed_precision process-wide; later runs in this process use "no"
        AcceleratorState._reset_state()
    assert results["test"]["retrieval"]["ndcg@10"] > results["test"]["popularity"]["ndcg@10"]
    recommender = Recommender.from_pretrained(tmp_path / "run")
    assert recommender.model.config.history_summary and recommender.model.user_encoder.summary_projection is not None
    assert recommender.pipeline.index.index_type == "hnsw" and recommender.pipeline.index.params["M"] == 8
    long_history = list(recommender.item_ids[:12])  # three times the window: the summary carries the rest
    ranked = recommender.recommend(long_history, k=5)
    items, scores = [item for item, _ in ranked], [score for _, score in ranked]
    assert len(set(items)) == 5 and not set(items) & set(long_history) and scores == sorted(scores, reverse=True)
    # The two serving paths agree: the head scores these items as recommend did.
    reranked = dict(recommender.rerank(long_history, items))
    np.testing.assert_allclose([reranked[item] for item in items], scores, rtol=0, atol=1e-5)
    # The history before the window is read (through the summary), not dropped.
    window_only = dict(recommender.rerank(long_history[-4:], items))
    assert max(abs(window_only[item] - reranked[item]) for item in items) > 1e-4
    # HNSW finds what an exact search finds on this small catalogue.
    exact = Recommender(
        recommender.model, recommender.tokenizer, list(recommender.item_ids), list(recommender.item_texts),
        recommender.item_popularity, index=build_item_index(recommender.model, "flat"),
    )
    assert [item for item, _ in exact.recommend(long_history, k=5)] == items


def test_length_chunked_text_encoding_equals_one_padded_batch(model):
    input_ids = torch.randint(1, 50, (9, 12))
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate([12, 3, 7, 1, 12, 5, 9, 2, 4]):
        attention_mask[row, length:] = 0
    with torch.no_grad():
        together = model.encode_item_texts(input_ids, attention_mask)
        chunked = encode_texts_by_length(model, input_ids, attention_mask, chunk_size=4)
    torch.testing.assert_close(chunked, together, atol=1e-5, rtol=1e-5)


def test_reduced_precision_recommenders_serve_and_refuse_to_save(trained_run, tmp_path):
    from llmrec import Recommender
    from llmrec.errors import InvalidRequestError

    folder, _ = trained_run
    fp32 = Recommender.from_pretrained(folder)
    history = fp32.item_ids[:5]
    expected = [item for item, _ in fp32.recommend(history, k=10)]
    for options in ({"precision": "bf16"}, {"quantize": "int8"}):
        recommender = Recommender.from_pretrained(folder, **options)
        got = [item for item, _ in recommender.recommend(history, k=10)]
        assert len(set(got) & set(expected)) >= 7, options  # the catalogue cache is exact; only the head/encoder change
        recommender.add_items(["brand-new"], ["a new title genre 1"])
        assert recommender.recommend(history, k=200)  # new items encoded at reduced precision
        with pytest.raises(InvalidRequestError, match="reduced precision"):
            recommender.save_pretrained(tmp_path / "copy")
    assert next(Recommender.from_pretrained(folder, precision="bf16").model.item_encoder.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Choose one of"):
        Recommender.from_pretrained(folder, precision="bf16", quantize="int8")
