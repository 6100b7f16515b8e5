"""Length-grouped batches: every example once per epoch, a (seed, epoch)-only order, padding to the batch's
longest, and the same embeddings, losses and metrics as padding everything to the window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig

from llmrec.evaluation import evaluate_ranking
from llmrec.modeling import LlmRecConfig, LlmRecForRetrieval, LlmRecModel, split_histories
from llmrec.training.examples import collate_next_item, collate_rerank, next_item_windows, RerankExample
from llmrec.training.samplers import LengthGroupedBatchSampler, derived_seed
from llmrec.utils.length_order import length_sorted_batches

NUM_ITEMS = 40
WINDOW = 24
TOLERANCE = 1e-6

lengths_strategy = st.lists(st.integers(min_value=1, max_value=WINDOW), min_size=1, max_size=300)


@pytest.fixture(scope="module")
def model() -> LlmRecModel:
    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = LlmRecConfig(
        encoder_config=encoder.to_dict(), num_items=NUM_ITEMS, hidden_size=16, max_history_length=WINDOW,
        user_num_heads=2, rerank_num_heads=2, dropout=0.0, use_id_embeddings=True,
    )
    model = LlmRecModel(config)
    with torch.no_grad():
        model.item_text_embeddings[1:].normal_()
        model.user_encoder.position_embeddings.weight.normal_()  # positions must matter for the test to mean anything
    model.warm_items[1:] = True
    return model.eval()


def _histories(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.choice([1, 2, 3, 5, 8, 13, WINDOW, WINDOW + 7], size=count)
    return [rng.integers(1, NUM_ITEMS + 1, size=length).tolist() for length in lengths]


def _padded_to_window(histories: list[list[int]]) -> torch.Tensor:
    padded = torch.zeros(len(histories), WINDOW, dtype=torch.long)
    for row, history in enumerate(histories):
        recent = history[-WINDOW:]
        padded[row, WINDOW - len(recent):] = torch.tensor(recent)
    return padded


@settings(max_examples=40, deadline=None, derandomize=True)
@given(lengths=lengths_strategy, batch_size=st.integers(1, 40), by_positions=st.booleans(), epoch=st.integers(1, 5))
def test_every_example_is_in_exactly_one_batch_per_epoch(lengths, batch_size, by_positions, epoch):
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=7, loss_terms=lengths if by_positions else None)
    sampler.epoch = epoch
    batches = list(sampler)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    assert len(sampler) == len(batches)
    if not by_positions:  # one loss term per example: batches of batch_size, as a plain DataLoader makes them
        assert sorted((len(batch) for batch in batches), reverse=True)[:-1] == [batch_size] * (len(batches) - 1)
    else:  # a batch holds batch_size examples' worth of positions on average: it closes once it has them
        budget = batch_size * sum(lengths) / len(lengths)
        assert all(sum(lengths[i] for i in batch[:-1]) < budget for batch in batches)


def test_order_depends_only_on_seed_and_epoch():
    lengths = [int(length) for length in np.random.default_rng(1).integers(1, 200, size=2000)]

    def batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = LengthGroupedBatchSampler(lengths, 64, seed=seed, loss_terms=lengths)
        sampler.epoch = epoch
        return list(sampler)

    torch.manual_seed(123)  # the global RNG plays no part
    first = batches(42, 3)
    torch.manual_seed(456)
    assert batches(42, 3) == first
    assert batches(42, 4) != first
    assert batches(43, 3) != first


def test_batches_group_similar_lengths():
    """Mixed short and long windows: bucketed batches pad far less than random ones would."""
    lengths = [int(length) for length in np.random.default_rng(2).choice([2, 5, 200], size=3000, p=[0.6, 0.3, 0.1])]
    sampler = LengthGroupedBatchSampler(lengths, 64, seed=0, loss_terms=lengths)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in sampler)
    assert padded < 1.2 * sum(lengths)
    # and an epoch keeps about the number of steps batches of 64 windows gave it
    assert abs(len(sampler) - len(lengths) / 64) <= 0.2 * len(lengths) / 64


def test_stage1_batch_pads_to_its_longest_window():
    sequences = _histories(60, seed=3)
    windows = [window for window in next_item_windows(sequences, WINDOW) if len(window) >= 2]
    positions = [min(len(window) - 1, WINDOW) for window in windows]
    for batch in LengthGroupedBatchSampler(positions, 8, seed=0, loss_terms=positions):
        collated = collate_next_item([windows[i] for i in batch], WINDOW)
        assert collated["history_item_indices"].shape[1] == max(positions[i] for i in batch)
        assert int((collated["target_item_indices"] >= 0).sum()) == sum(positions[i] for i in batch)


def test_stage2_batch_pads_to_its_longest_history():
    histories = _histories(30, seed=4)
    examples = [RerankExample(history, np.arange(1, 6), 0) for history in histories]
    lengths = [min(len(history), WINDOW) for history in histories]
    for batch in LengthGroupedBatchSampler(lengths, 8, seed=0):
        collated = collate_rerank([examples[i] for i in batch], WINDOW)
        assert collated["history_item_indices"].shape[1] == max(lengths[i] for i in batch)


def test_user_embeddings_and_losses_do_not_depend_on_padding_width(model):
    histories = [history for history in _histories(16, seed=5) if len(history) >= 2][:8]
    windows = [history[-(WINDOW + 1):] for history in histories]
    short = [window[:2] for window in windows]  # a batch of short windows: pads to 1 slot, not WINDOW
    for chosen in (windows, short):
        collated = collate_next_item(chosen, WINDOW)
        narrow_inputs, narrow_targets = collated["history_item_indices"], collated["target_item_indices"]
        pad = WINDOW - narrow_inputs.shape[1]
        wide_inputs = torch.nn.functional.pad(narrow_inputs, (pad, 0), value=0)
        wide_targets = torch.nn.functional.pad(narrow_targets, (pad, 0), value=-100)
        assert torch.equal(wide_inputs, _padded_to_window([window[:-1] for window in chosen]))
        full_softmax, sampled_softmax = LlmRecForRetrieval(model), LlmRecForRetrieval(model, loss="sampled_softmax")
        with torch.no_grad():
            narrow = full_softmax(narrow_inputs, narrow_targets)
            wide = full_softmax(wide_inputs, wide_targets)
            sampled = torch.unique(torch.cat([narrow_targets[narrow_targets > 0], torch.arange(1, 11)]))
            log_q = torch.zeros(len(sampled))
            narrow_sampled = sampled_softmax(narrow_inputs, narrow_targets, sampled_item_indices=sampled, sampled_log_q=log_q)
            wide_sampled = sampled_softmax(wide_inputs, wide_targets, sampled_item_indices=sampled, sampled_log_q=log_q)
        torch.testing.assert_close(narrow.user_embeddings, wide.user_embeddings, atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(narrow.loss, wide.loss, atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(narrow_sampled.loss, wide_sampled.loss, atol=TOLERANCE, rtol=TOLERANCE)

    candidates = torch.randint(1, NUM_ITEMS + 1, (len(short), 6), generator=torch.Generator().manual_seed(0))
    narrow_window, _ = split_histories(short, WINDOW)
    item_embeddings = model.item_embeddings()
    with torch.no_grad():
        narrow_scores, _ = model.score_candidates(narrow_window, candidates, item_embeddings)
        wide_scores, _ = model.score_candidates(_padded_to_window(short), candidates, item_embeddings)
    torch.testing.assert_close(narrow_scores, wide_scores, atol=TOLERANCE, rtol=TOLERANCE)


def test_length_sorted_batches_cover_every_position_longest_first():
    lengths = [3, 0, 7, 7, 1, 200, 3]
    batches = length_sorted_batches(lengths, 3)
    assert [batch.tolist() for batch in batches] == [[5, 2, 3], [0, 6, 4], [1]]


def test_evaluation_metrics_identical_with_and_without_bucketing(model):
    histories = [history for history in _histories(150, seed=6) if len(history) >= 2]
    targets = [history[-1] for history in histories]
    histories = [history[:-1] for history in histories]
    item_embeddings = model.item_embeddings()
    widths = []

    @torch.no_grad()
    def score(batch_histories):
        window, older = split_histories(batch_histories, WINDOW)
        widths.append(window.shape[1])
        users = model.encode_users(window, item_embeddings, older_item_indices=older)[:, -1]
        return model.similarity(users, item_embeddings)

    def score_in_order(batch_histories):
        return score(batch_histories)

    score_in_order.scores_in_input_order = True
    bucketed = evaluate_ranking(score, histories, targets, NUM_ITEMS, ks=(1, 5, 10), batch_size=16)
    bucketed_widths, widths[:] = list(widths), []
    in_order = evaluate_ranking(score_in_order, histories, targets, NUM_ITEMS, ks=(1, 5, 10), batch_size=16)
    assert bucketed == in_order
    assert sum(bucketed_widths) < sum(widths)  # and bucketing is what made the batches narrower


def test_without_grouping_batches_are_the_seeded_permutation_cut_in_order():
    """group_by_length off (the default) draws the order earlier llmrec versions drew: one permutation per epoch."""
    sampler = LengthGroupedBatchSampler([5, 1, 9, 2, 7, 3, 8], batch_size=3, seed=11, group_by_length=False)
    sampler.epoch = 2
    permutation = torch.randperm(7, generator=torch.Generator().manual_seed(derived_seed(11, 2))).tolist()
    assert sampler.batches() == [permutation[0:3], permutation[3:6], permutation[6:7]]
    sampler.epoch = 3
    assert sampler.batches() != [permutation[0:3], permutation[3:6], permutation[6:7]]


def test_training_group_by_length_reaches_both_stages_samplers(monkeypatch, planted_data_dir, tiny_encoder_dir, tmp_path):
    from llmrec.config import load_config
    from llmrec.training import run_finetune, trainer
    from tests.conftest import tiny_overrides

    made = []

    class Recording(LengthGroupedBatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(trainer, "LengthGroupedBatchSampler", Recording)
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "run")
    overrides["training"].update(retrieval_epochs=1, rerank_epochs=1, group_by_length=True)
    run_finetune(load_config(overrides=overrides))
    assert len(made) == 2 and all(sampler.group_by_length for sampler in made)
