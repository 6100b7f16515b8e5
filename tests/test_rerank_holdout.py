"""`training.rerank_holdout`: stage 2 trains only on positions stage 1 never fitted."""

from __future__ import annotations

import random

import pytest

from llmrec.training import trainer
from llmrec.training.examples import (
    first_held_out_position, held_out_prefixes, next_item_windows, rerank_prefixes, retrieval_sequences,
)


def _position_coded_sequences(lengths: list[int]) -> list[list[int]]:
    """Item ids that name their (user, position), so a target tells where it came from."""
    return [[1000 * user + position + 1 for position in range(length)] for user, length in enumerate(lengths)]


def _stage1_targets(sequences: list[list[int]], max_history_length: int) -> set[int]:
    return {item for window in next_item_windows(sequences, max_history_length) for item in window[1:]}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("positions_per_user", [1, 3, 8])
def test_held_out_positions_are_never_stage1_targets(seed, positions_per_user):
    rng = random.Random(seed)
    sequences = _position_coded_sequences([rng.randrange(0, 30) for _ in range(40)])
    stage1 = _stage1_targets(retrieval_sequences(sequences, positions_per_user), max_history_length=5)
    histories, targets = held_out_prefixes(sequences, positions_per_user)

    assert stage1.isdisjoint(targets)
    # Together they are every training target (position >= 1) exactly once.
    every_target = {item for sequence in sequences for item in sequence[1:]}
    assert stage1 | set(targets) == every_target and len(targets) == len(set(targets))
    # A stage-2 example's history is everything before its target, held-out items included.
    for history, target in zip(histories, targets):
        user, position = divmod(target - 1, 1000)
        assert history == sequences[user][:position]
    # Every user with a target keeps its first one in stage 1, and holds out at most positions_per_user.
    for sequence in sequences:
        if len(sequence) >= 2:
            assert sequence[1] in stage1
            assert sum(item in set(targets) for item in sequence) == min(positions_per_user, len(sequence) - 2)


def test_cut_keeps_the_first_target_and_holds_out_the_last_positions():
    assert [first_held_out_position(length, 3) for length in range(7)] == [2, 2, 2, 2, 2, 2, 3]
    assert retrieval_sequences([[1, 2, 3, 4, 5, 6], [7, 8], [9]], 3) == [[1, 2, 3], [7, 8], [9]]
    assert held_out_prefixes([[1, 2, 3, 4, 5, 6], [7, 8], [9]], 3) == ([[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5]], [4, 5, 6])
    # Without the hold-out, stage 2 reads the most recent positions, which stage 1 also trains on.
    assert rerank_prefixes([[1, 2, 3, 4, 5, 6]], 3) == ([[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5]], [4, 5, 6])


@pytest.mark.parametrize("holdout", [True, False])
def test_training_feeds_each_stage_its_positions(monkeypatch, planted_data_dir, tiny_encoder_dir, tmp_path, holdout):
    from llmrec.config import load_config
    from llmrec.training import run_finetune
    from tests.conftest import tiny_overrides

    stage1_windows, stage2_examples = [], []
    collate_rerank = trainer.collate_rerank

    def recording_windows(sequences, *args, **kwargs):
        windows = next_item_windows(sequences, *args, **kwargs)
        stage1_windows.extend(windows)
        return windows

    def recording_collate(examples, *args, **kwargs):
        stage2_examples.extend(examples)
        return collate_rerank(examples, *args, **kwargs)

    monkeypatch.setattr(trainer, "next_item_windows", recording_windows)
    monkeypatch.setattr(trainer, "collate_rerank", recording_collate)
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "run")
    overrides["training"].update(retrieval_epochs=1, rerank_epochs=1, rerank_positions_per_user=3, rerank_holdout=holdout)
    run_finetune(load_config(overrides=overrides))

    # The planted histories are shorter than the window, so each window is a user's whole training sequence
    # and a slot's (prefix, target) names a position as a stage-2 example's (history, target) does.
    stage1 = {(tuple(window[:slot]), window[slot]) for window in stage1_windows for slot in range(1, len(window))}
    stage2 = {(tuple(example.history), int(example.candidates[example.label])) for example in stage2_examples}
    assert stage1 and stage2
    assert stage1.isdisjoint(stage2) if holdout else stage2 <= stage1
