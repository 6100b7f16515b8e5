"""Turn canonical interactions into per-user chronological sequences and evaluation examples.

Items are referred to by 1-based indices into the catalogue (index 0 is padding), so models
can use the indices directly as embedding rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .loaders import InteractionData

logger = logging.getLogger(__name__)


@dataclass
class EvaluationExamples:
    """One next-item example per evaluated user: the history the model sees and the held-out target."""

    user_indices: list[int] = field(default_factory=list)  # index into SequentialSplit.user_ids
    histories: list[list[int]] = field(default_factory=list)  # chronological 1-based item indices
    targets: list[int] = field(default_factory=list)  # held-out next item index

    def __len__(self) -> int:
        return len(self.targets)

    def add(self, user_index: int, history: list[int], target: int) -> None:
        self.user_indices.append(user_index)
        self.histories.append(history)
        self.targets.append(target)


@dataclass
class SequentialSplit:
    """Catalogue, per-user training sequences and the valid/test examples of one split."""

    item_ids: list[str]  # item index i+1 <-> item_ids[i]; index 0 is reserved for padding
    item_texts: list[str]  # aligned with item_ids
    user_ids: list[str]
    train_sequences: list[list[int]]  # aligned with user_ids
    valid: EvaluationExamples
    test: EvaluationExamples
    # Cold-start splits only: the held-out items (cold_items) or users (cold_users), and the examples
    # whose target is a cold item / whose user is cold. Empty for leave_one_out and temporal.
    cold_item_indices: list[int] = field(default_factory=list)
    cold_user_indices: list[int] = field(default_factory=list)
    cold_test: EvaluationExamples = field(default_factory=EvaluationExamples)
    # Profile text per user (aligned with user_ids; None = no profile); empty when the data has no users file.
    user_profiles: list[Optional[str]] = field(default_factory=list)

    @property
    def num_items(self) -> int:
        """Catalogue size, padding excluded."""
        return len(self.item_ids)

    @cached_property
    def item_index(self) -> dict[str, int]:
        """Raw item id -> 1-based item index."""
        return {item_id: position + 1 for position, item_id in enumerate(self.item_ids)}

    def item_popularity(self) -> np.ndarray:
        """Training interaction count per item index (float64, shape num_items + 1, padding slot 0 = 0)."""
        flat = [index for sequence in self.train_sequences for index in sequence]
        counts = np.bincount(np.asarray(flat, dtype=np.int64), minlength=self.num_items + 1).astype(np.float64)
        counts[0] = 0.0
        return counts


def build_split(data: InteractionData, config: DataConfig) -> SequentialSplit:
    """Split interactions per ``config.split`` into training sequences and valid/test examples.

    The catalogue is every item of ``data.items`` in its order (items nobody interacted with stay
    rankable). Users appear in order of their first interaction in the file, and each user's
    interactions are ordered by timestamp with a stable sort, so ties keep file order.

    ``leave_one_out``: a user's last interaction is the test target (history: everything before
    it), the second last is the valid target (history: everything before that), the rest is
    training. Users with fewer than 3 interactions (a single one included) keep them all for
    training and get no valid/test example; their number is logged.

    Sequence files have no timestamps: positions within each user's history stand in, which orders
    every user's items (all that ``leave_one_out``, ``cold_items`` and ``cold_users`` need), so
    ``temporal`` is refused and ``cold_items`` with ``newest`` ranks items by their earliest position.

    ``temporal``: global time cut-offs put about ``temporal_test_fraction`` of the interactions
    (the newest) in a test window and ``temporal_valid_fraction`` before them in a valid window.
    Training is each user's interactions before the valid window. A user's valid example is their
    first interaction in the valid window with all earlier ones as history; the test example is
    their first interaction in the test window with all earlier ones (train and valid windows) as
    history. Users whose history would be empty get no example (so a user with a single
    interaction only trains, or is skipped if it falls in a valid/test window); logged as well.

    Raises :class:`DataError` for a catalogue of fewer than two items and for a split without
    any valid or test example, which nothing could be evaluated (or early-stopped) on.
    """
    item_ids, item_texts = _catalogue(data)
    item_index = {item_id: position + 1 for position, item_id in enumerate(item_ids)}
    user_ids, sequences, sequence_times = _user_sequences(data, item_index)
    split = _split_sequences(data, config, sequences, sequence_times)
    _require_examples(config, split.valid, split.test, len(user_ids))
    _require_cold_examples(config, split.cold_test)
    logger.info("%s split: %d users, %d items, %d training interactions, %d valid, %d test and %d cold-test examples.",
                config.split, len(user_ids), len(item_ids), sum(map(len, split.train_sequences)), len(split.valid),
                len(split.test), len(split.cold_test))
    return SequentialSplit(item_ids, item_texts, user_ids, split.train_sequences, split.valid, split.test,
                           cold_item_indices=split.cold_items, cold_user_indices=split.cold_users,
                           cold_test=split.cold_test, user_profiles=_aligned_profiles(data, user_ids))


@dataclass
class _ProtocolSplit:
    """What one split protocol makes of the user sequences; the cold fields stay empty outside cold-start splits."""

    train_sequences: list[list[int]]
    valid: EvaluationExamples
    test: EvaluationExamples
    cold_test: EvaluationExamples = field(default_factory=EvaluationExamples)
    cold_items: list[int] = field(default_factory=list)
    cold_users: list[int] = field(default_factory=list)


def _catalogue(data: InteractionData) -> tuple[list[str], list[str]]:
    """Item ids and texts in ``data.items`` order; DataError for fewer than two items (nothing to rank)."""
    item_ids = [str(item_id) for item_id in data.items["item_id"]]
    if len(item_ids) < 2:
        raise DataError(f"The item catalogue has {len(item_ids)} item(s) ({item_ids}); there is nothing to recommend "
                        "or rank. Load the full catalogue (data.items_file / data.path).")
    return item_ids, [str(text) for text in data.items["text"]]


def _split_sequences(data: InteractionData, config: DataConfig, sequences: list[list[int]],
                     sequence_times: list[np.ndarray]) -> _ProtocolSplit:
    """Apply the protocol ``config.split`` names (see `build_split`), refusing what the data cannot support."""
    if config.split == "leave_one_out":
        return _ProtocolSplit(*_leave_one_out(sequences))
    if config.split == "temporal":
        if data.timestamps_are_positions:
            raise DataError("data.split temporal needs a clock shared by all users, but this data (a sequence file) "
                            "has only each user's order: its timestamps are positions in each user's history. Use "
                            "data.split: leave_one_out (the protocol sequence-file benchmarks publish), cold_items "
                            "or cold_users.")
        return _ProtocolSplit(*_temporal(sequences, sequence_times, config.temporal_valid_fraction,
                                         config.temporal_test_fraction))
    if config.split == "cold_items":
        if data.timestamps_are_positions and config.cold_item_selection == "newest":
            logger.warning("cold_items with selection newest on a sequence file: without timestamps, 'newest' means "
                           "the items whose earliest position in any user's history is latest (a proxy for new items; "
                           "data.cold_item_selection: random does not depend on it).")
        cold_items = _choose_cold_items(sequences, sequence_times, config)
        return _ProtocolSplit(*_cold_items(sequences, set(cold_items)), cold_items=cold_items)
    if config.split == "cold_users":
        cold_users = _choose_cold_users(sequences, config)
        return _ProtocolSplit(*_cold_users(sequences, set(cold_users), config.cold_user_history_length),
                              cold_users=cold_users)
    raise DataError(f"data.split must be one of leave_one_out, temporal, cold_items, cold_users; got {config.split!r}.")


def _require_cold_examples(config: DataConfig, cold_test: EvaluationExamples) -> None:
    """A cold-start split must hold at least one cold example, else its headline metric is undefined."""
    if config.split in ("cold_items", "cold_users") and len(cold_test) == 0:
        raise DataError(f"The {config.split} split has no cold example: no user has an interaction on a held-out item "
                        "after an earlier one (cold_items) or enough interactions (cold_users). Raise "
                        "data.cold_item_fraction / data.cold_user_fraction or lower data.cold_user_history_length.")


def _aligned_profiles(data: InteractionData, user_ids: list[str]) -> list[Optional[str]]:
    profiles = data.user_profiles
    if not profiles:
        return []
    aligned = [profiles.get(user_id) for user_id in user_ids]
    missing = sum(profile is None for profile in aligned)
    if missing:
        logger.info("%d of %d users have no profile (no row in the users file, or an empty one).", missing, len(user_ids))
    return aligned


def _require_examples(config: DataConfig, valid: EvaluationExamples, test: EvaluationExamples, num_users: int) -> None:
    """Training would crash at its first validation (or report nothing) without examples; say why up front."""
    empty = [name for name, examples in (("valid", valid), ("test", test)) if len(examples) == 0]
    if not empty:
        return
    if config.split != "temporal":
        reason = (f"none of the {num_users} user(s) has the 3 or more (warm) interactions leave-one-out needs "
                  "(1+ to train, 1 valid, 1 test)")
        fix = "Use data with longer histories, or lower data.rating_threshold if it removed most interactions."
    else:
        reason = ("no user with earlier history has an interaction in that time window (timestamps too coarse, "
                  "or every such user is new)")
        fix = ("Raise data.temporal_valid_fraction / data.temporal_test_fraction, check data.timestamp_column, "
               "or use data.split: leave_one_out.")
    raise DataError(f"The {config.split} split has no {' or '.join(empty)} example: {reason}. {fix}")


def _user_sequences(data: InteractionData, item_index: dict[str, int]
                    ) -> tuple[list[str], list[list[int]], list[np.ndarray]]:
    """Per-user item indices and timestamps in chronological order (stable: ties keep file order)."""
    frame = data.interactions.select_columns(["user_id", "item_id", "timestamp"]).to_pandas()
    if len(frame) == 0:
        raise DataError("There are no interactions to split; check the data and data.rating_threshold.")
    unknown = sorted(set(frame["item_id"]) - item_index.keys())
    if unknown:
        raise DataError(f"{len(unknown)} interacted item id(s) are missing from the items table (e.g. {unknown[:5]}); "
                        "load the data with load_interaction_data, which drops them.")
    user_codes, user_ids = _codes_in_first_appearance_order(frame["user_id"].to_numpy())
    items = frame["item_id"].map(item_index).to_numpy(dtype=np.int64)
    times = frame["timestamp"].to_numpy(dtype=np.float64)
    order = np.argsort(times, kind="stable")
    order = order[np.argsort(user_codes[order], kind="stable")]  # group by user, keep time (then file) order
    boundaries = np.flatnonzero(np.diff(user_codes[order])) + 1
    sequences = [chunk.tolist() for chunk in np.split(items[order], boundaries)]
    sequence_times = np.split(times[order], boundaries)
    return user_ids, sequences, sequence_times


def _codes_in_first_appearance_order(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    unique, first_positions, codes = np.unique(values, return_index=True, return_inverse=True)
    rank = np.empty(len(unique), dtype=np.int64)
    rank[np.argsort(first_positions, kind="stable")] = np.arange(len(unique))
    ordered_ids = [str(user_id) for user_id in unique[np.argsort(first_positions, kind="stable")]]
    return rank[codes.reshape(-1)], ordered_ids


def _leave_one_out(sequences: list[list[int]]
                   ) -> tuple[list[list[int]], EvaluationExamples, EvaluationExamples]:
    train_sequences, valid, test = [], EvaluationExamples(), EvaluationExamples()
    too_short = single = 0
    for user_index, sequence in enumerate(sequences):
        if len(sequence) < 3:
            train_sequences.append(list(sequence))
            too_short += 1
            single += len(sequence) == 1
            continue
        train_sequences.append(sequence[:-2])
        valid.add(user_index, sequence[:-2], sequence[-2])
        test.add(user_index, sequence[:-1], sequence[-1])
    if too_short:
        logger.info("%d user(s) have fewer than 3 interactions (%d of them a single one): all their interactions "
                    "go to training and they get no valid/test example.", too_short, single)
    return train_sequences, valid, test


def _temporal(sequences: list[list[int]], sequence_times: list[np.ndarray], valid_fraction: float,
              test_fraction: float) -> tuple[list[list[int]], EvaluationExamples, EvaluationExamples]:
    all_times = np.sort(np.concatenate(sequence_times))
    total = len(all_times)
    test_count = max(1, int(round(total * test_fraction)))
    valid_count = max(1, int(round(total * valid_fraction)))
    test_start = all_times[max(total - test_count, 0)]
    valid_start = all_times[max(total - test_count - valid_count, 0)]
    if valid_start == test_start:
        logger.warning("Temporal split: timestamps are too coarse, the valid window is empty.")
    train_sequences, valid, test = [], EvaluationExamples(), EvaluationExamples()
    skipped_valid = skipped_test = 0
    for user_index, (sequence, times) in enumerate(zip(sequences, sequence_times)):
        first_valid = int(np.searchsorted(times, valid_start, side="left"))  # times are sorted per user
        first_test = int(np.searchsorted(times, test_start, side="left"))
        train_sequences.append(sequence[:first_valid])
        if first_valid < first_test:  # the user has an interaction in the valid window
            if first_valid > 0:
                valid.add(user_index, sequence[:first_valid], sequence[first_valid])
            else:
                skipped_valid += 1
        if first_test < len(sequence):
            if first_test > 0:
                test.add(user_index, sequence[:first_test], sequence[first_test])
            else:
                skipped_test += 1
    logger.info("Temporal split: valid window starts at %s, test window at %s; %d valid and %d test candidates "
                "skipped for an empty history.", valid_start, test_start, skipped_valid, skipped_test)
    return train_sequences, valid, test


def _choose_cold_items(sequences: list[list[int]], sequence_times: list[np.ndarray], config: DataConfig) -> list[int]:
    """Item indices to hold out: a seeded random sample, or the newest by first interaction, of the interacted items."""
    items = np.concatenate([np.asarray(sequence, dtype=np.int64) for sequence in sequences])
    times = np.concatenate(sequence_times)
    interacted = np.unique(items)
    if len(interacted) < 2:
        raise DataError("data.split cold_items needs at least two interacted items (one warm, one cold).")
    count = min(len(interacted) - 1, max(1, int(round(len(interacted) * config.cold_item_fraction))))
    if config.cold_item_selection == "newest":
        first_seen = np.full(items.max() + 1, np.inf)
        np.minimum.at(first_seen, items, times)
        # Newest first; among items first seen at the same time, the higher index (later in the catalogue) first.
        order = np.lexsort((-interacted, -first_seen[interacted]))
        chosen = interacted[order[:count]]
    else:
        chosen = np.random.default_rng(config.seed).choice(interacted, size=count, replace=False)
    logger.info("cold_items: holding out %d of %d interacted items (%s).", count, len(interacted), config.cold_item_selection)
    return sorted(int(item) for item in chosen)


def _cold_items(sequences: list[list[int]], cold_items: set[int]
                ) -> tuple[list[list[int]], EvaluationExamples, EvaluationExamples, EvaluationExamples]:
    warm_sequences = [[item for item in sequence if item not in cold_items] for sequence in sequences]
    train_sequences, valid, test = _leave_one_out(warm_sequences)
    cold_test = EvaluationExamples()
    for user_index, sequence in enumerate(sequences):
        first_cold = next((position for position, item in enumerate(sequence) if item in cold_items), None)
        # A user whose very first interaction is cold has no history to recommend from.
        if first_cold:
            cold_test.add(user_index, sequence[:first_cold], sequence[first_cold])
    return train_sequences, valid, test, cold_test


def _choose_cold_users(sequences: list[list[int]], config: DataConfig) -> list[int]:
    """A seeded random sample of the users with enough interactions for a cold example."""
    eligible = [user for user, sequence in enumerate(sequences) if len(sequence) > config.cold_user_history_length]
    count = min(len(eligible), max(1, int(round(len(eligible) * config.cold_user_fraction)))) if eligible else 0
    chosen = np.random.default_rng(config.seed).choice(eligible, size=count, replace=False) if count else []
    logger.info("cold_users: holding out %d of %d eligible users.", count, len(eligible))
    return sorted(int(user) for user in chosen)


def _cold_users(sequences: list[list[int]], cold_users: set[int], history_length: int
                ) -> tuple[list[list[int]], EvaluationExamples, EvaluationExamples, EvaluationExamples]:
    warm_sequences = [[] if user in cold_users else sequence for user, sequence in enumerate(sequences)]
    train_sequences, valid, test = _leave_one_out(warm_sequences)
    cold_test = EvaluationExamples()
    for user in sorted(cold_users):
        cold_test.add(user, sequences[user][:history_length], sequences[user][history_length])
    return train_sequences, valid, test, cold_test
