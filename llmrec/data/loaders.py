"""Load interactions, item metadata and user attributes from any supported layout into one canonical form.

Whatever the source (RecBole atomic files, the official MovieLens folder, csv/tsv/jsonl/parquet,
sequence files),
the result has the same columns, so splitting, training and evaluation never care where the
data came from. Every bad input raises :class:`llmrec.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import DataError
from .columns import check_columns, parse_ids, parse_numbers, parse_timestamps
from .item_text import render_item_texts, value_to_text
from .layouts import (BUNDLED_DATASET_NAME, TABLE_FORMATS, bundled_movielens_folder, data_folder,  # noqa: F401
                      format_from_extension, read_raw_tables, resolve_table_file)
from .readers import RawTables, read_movielens_users, read_recbole_users, read_table
from .user_text import render_user_profiles

logger = logging.getLogger(__name__)


@dataclass
class InteractionData:
    """Canonical interactions (user_id, item_id, timestamp[, rating], in file order) and items (item_id, text, ...).

    `users` (user_id, profile, attribute columns) is there when a users file was read; `profile` is ""
    for a user whose profile rendered empty. `users_note` says why there is none otherwise.
    """

    interactions: datasets.Dataset
    items: datasets.Dataset
    users: Optional[datasets.Dataset] = None
    users_note: Optional[str] = None
    # True for sequence files: each timestamp is the interaction's position in its user's history (0, 1, ...),
    # so timestamps order one user's items but are no clock shared across users.
    timestamps_are_positions: bool = False

    @property
    def user_profiles(self) -> dict[str, str]:
        """User id -> profile text, for the users that have one (a user without a row has none)."""
        if self.users is None:
            return {}
        return {user_id: profile for user_id, profile in zip(self.users["user_id"], self.users["profile"]) if profile}


def load_interaction_data(config: DataConfig) -> InteractionData:
    """Read the data the config points at (default: MovieLens-100k from the RecBole wheel).

    What happens to imperfect input (each logged as a warning naming the file and the count):
    interactions whose item has no row in the items file are dropped (an error if that is all of them);
    rows repeating the same user, item and timestamp are dropped, keeping the first; items whose text
    renders empty get their item id as text (in a sequence file's items file that is an error instead);
    texts longer than ``data.max_item_text_chars`` are cut; HTML character references such as ``&amp;``
    in item texts are unescaped (``data.unescape_html``).
    Timestamps may be numbers in one unit (e.g. Unix seconds; a column mixing seconds with milliseconds, or
    holding inf, is an error) or ISO 8601 dates/times (naive ones read as UTC). Sequence files
    (``data.format: sequences``) have none: each interaction's position in its user's line stands in.
    Anything else wrong raises :class:`DataError` naming the file, row or column and the fix.

    User profiles come from ``data.users_file``, else from the layout's own users file (RecBole
    ``{dataset_name}.user``, MovieLens ``u.user``), rendered with ``data.user_profile_template``. A file named
    in the config must be usable (:class:`DataError` otherwise); one found next to the data that does not fit
    the template is skipped with a warning, so that data sets whose users file nobody asked for still load.
    """
    config.validate()
    raw = read_raw_tables(config)
    interactions = _canonical_interactions(raw)
    items = _canonical_items(raw, config)
    interactions = _apply_rating_threshold(interactions, config.rating_threshold, raw.interactions_source)
    interactions = _drop_unknown_items(interactions, items, raw)
    interactions = _drop_duplicate_interactions(interactions, raw.interactions_source)
    if len(items) < 2:  # checked last so that a more specific problem with the files is reported first
        raise DataError(f"{raw.items_source} describes only {len(items)} item ({items['item_id'].tolist()}); "
                        "with a catalogue of one there is nothing to recommend or rank. Point data.items_file "
                        "(or data.path) at the full item catalogue.")
    logger.info(
        "Loaded %d interactions from %d users over %d items (%s).",
        len(interactions), interactions["user_id"].nunique(), len(items), raw.interactions_source,
    )
    interaction_features = {"user_id": datasets.Value("string"), "item_id": datasets.Value("string"),
                            "timestamp": datasets.Value("float64")}
    if "rating" in interactions.columns:
        interaction_features["rating"] = datasets.Value("float64")
    item_features = {name: datasets.Value("string") for name in items.columns}
    users, users_note = _load_users(config, raw)
    return InteractionData(
        interactions=datasets.Dataset.from_pandas(
            interactions, preserve_index=False, features=datasets.Features(interaction_features)),
        items=datasets.Dataset.from_pandas(items, preserve_index=False, features=datasets.Features(item_features)),
        users=None if users is None else datasets.Dataset.from_pandas(
            users, preserve_index=False, features=datasets.Features({name: datasets.Value("string") for name in users.columns})),
        users_note=users_note,
        timestamps_are_positions=raw.timestamps_are_positions,
    )


def _canonical_interactions(raw: RawTables) -> pd.DataFrame:
    frame, columns, source = raw.interactions, raw.columns, raw.interactions_source
    if len(frame) == 0:
        raise DataError(f"{source} has no interactions (only a header?); add data rows.")
    wanted = {"user_column": columns.user, "item_column": columns.item}
    if columns.timestamp is not None:
        wanted["timestamp_column"] = columns.timestamp
    check_columns(frame, wanted, source)
    canonical = pd.DataFrame({
        "user_id": parse_ids(frame[columns.user], columns.user, source),
        "item_id": parse_ids(frame[columns.item], columns.item, source),
    })
    if columns.timestamp is None:
        canonical["timestamp"] = np.arange(len(frame), dtype=np.float64)  # file order is the only clock
    else:
        canonical["timestamp"] = parse_timestamps(frame[columns.timestamp], columns.timestamp, source)
    if columns.rating is not None and columns.rating in frame.columns:
        canonical["rating"] = parse_numbers(frame[columns.rating], columns.rating, source,
                                             "Ratings must be numbers; fix the file or set data.rating_column: null.")
    elif columns.rating is not None:
        logger.info("%s has no rating column %r; treating every interaction as implicit feedback.", source, columns.rating)
    return canonical


def _canonical_items(raw: RawTables, config: DataConfig) -> pd.DataFrame:
    frame, source, id_column = raw.items, raw.items_source, raw.columns.item
    if len(frame) == 0:
        raise DataError(f"{source} has no items (only a header?); add one row per item.")
    check_columns(frame, {"item_column": id_column}, source)
    items = pd.DataFrame({"item_id": parse_ids(frame[id_column], id_column, source)})
    for name in frame.columns:
        if name not in (id_column, "item_id", "text"):
            items[str(name)] = frame[name].map(value_to_text).astype(str)
    if "text" in frame.columns:
        logger.warning("%s has a 'text' column; it is replaced by the rendered item text.", source)
    duplicated = items["item_id"].duplicated().to_numpy()
    if duplicated.any():
        logger.warning("%s lists %d item id(s) more than once; keeping the first row of each.", source, int(duplicated.sum()))
        items = items[~duplicated].reset_index(drop=True)
    if raw.item_text_from_ids:
        items.insert(1, "text", items["item_id"])
        return items
    rows_in_file = None
    if raw.empty_item_text_is_error:  # where each kept row is in the file, for the error message
        has_header_line = Path(source).suffix.lower() in (".csv", ".tsv", ".txt")
        rows_in_file = [f"line {row + 2}" if has_header_line else f"row {row + 1}" for row in np.flatnonzero(~duplicated)]
    items.insert(1, "text", render_item_texts(
        items, config.item_text_template, source, config.max_item_text_chars, unescape_html=config.unescape_html,
        value_separator=config.item_value_separator, empty_rows_are_errors=rows_in_file))
    return items


def _load_users(config: DataConfig, raw: RawTables) -> tuple[Optional[pd.DataFrame], Optional[str]]:
    """Canonical users (user_id, profile, attributes) and, when there are none, why."""
    if config.users_file is not None:
        path = resolve_table_file(config.users_file, data_folder(config), "users_file")
        users = _canonical_users(_read_users_file(path, config), config.user_column, config.user_profile_template, str(path))
        logger.info("Read %d user profiles from %s (e.g. %r).", len(users), path, users["profile"].iloc[0])
        return users, None
    if raw.users_file is None:
        return None, (f"no users file was found next to {raw.interactions_source} and data.users_file is not set")
    try:
        users = _canonical_users(_read_users_file(raw.users_file, config), raw.columns.user,
                                 config.user_profile_template, str(raw.users_file))
    except DataError as error:
        logger.warning("Not using the users file %s found next to the data: %s", raw.users_file, error)
        return None, f"the users file {raw.users_file} found next to the data could not be used: {error}"
    logger.info("Read %d user profiles from %s (e.g. %r).", len(users), raw.users_file, users["profile"].iloc[0])
    return users, None


def _read_users_file(path: Path, config: DataConfig) -> pd.DataFrame:
    """u.user as MovieLens' (pipe-separated, no header), other *.user files as RecBole's, the rest as tables."""
    if path.name == "u.user":
        return read_movielens_users(path)
    if path.suffix == ".user":
        return read_recbole_users(path, config.encoding)
    table_format = config.format if config.format in TABLE_FORMATS else format_from_extension(path)
    separator = config.field_delimiter(table_format) if config.delimiter is not None else None
    return read_table(path, table_format, separator, config.encoding)


def _canonical_users(frame: pd.DataFrame, id_column: str, template: str, source: str) -> pd.DataFrame:
    if len(frame) == 0:
        raise DataError(f"{source} has no users (only a header?); add one row per user, or unset data.users_file.")
    check_columns(frame, {"user_column": id_column}, source)
    users = pd.DataFrame({"user_id": parse_ids(frame[id_column], id_column, source)})
    duplicated = users["user_id"].duplicated(keep=False)
    if duplicated.any():
        examples = users.loc[duplicated, "user_id"].unique()[:5].tolist()
        raise DataError(f"{source} lists user id(s) {examples} more than once ({int(duplicated.sum())} rows); a user's "
                        "profile must come from one row. Remove or merge the duplicate rows.")
    for name in frame.columns:
        if name not in (id_column, "user_id", "profile"):
            users[str(name)] = frame[name].map(value_to_text).astype(str)
    profiles = render_user_profiles(users, template, source)
    users.insert(1, "profile", [profile or "" for profile in profiles])
    return users


def _apply_rating_threshold(interactions: pd.DataFrame, threshold: Optional[float], source: str) -> pd.DataFrame:
    """Explicit ratings -> implicit positives: keep rating >= threshold."""
    if threshold is None:
        return interactions
    if "rating" not in interactions.columns:
        raise DataError(f"data.rating_threshold is {threshold} but {source} has no rating column "
                        "(data.rating_column); unset data.rating_threshold or point data.rating_column at the ratings.")
    kept = interactions[interactions["rating"] >= threshold].reset_index(drop=True)
    if len(kept) == 0:
        raise DataError(f"data.rating_threshold {threshold} removes every interaction in {source}; lower it.")
    logger.info("rating_threshold %s kept %d of %d interactions.", threshold, len(kept), len(interactions))
    return kept


def _drop_unknown_items(interactions: pd.DataFrame, items: pd.DataFrame, raw: RawTables) -> pd.DataFrame:
    """Items without metadata cannot be encoded as text, so their interactions are dropped."""
    known = interactions["item_id"].isin(set(items["item_id"]))
    unknown = int((~known).sum())
    if unknown == 0:
        return interactions
    examples = interactions.loc[~known, "item_id"].unique()[:5].tolist()
    if unknown == len(interactions):
        raise DataError(f"None of the item ids in {raw.interactions_source} (e.g. {examples}) appear in "
                        f"{raw.items_source}; check that both files use the same ids (data.item_column).")
    logger.warning("Dropping %d interaction(s) in %s whose item has no row in %s (e.g. %s).",
                   unknown, raw.interactions_source, raw.items_source, examples)
    return interactions[known].reset_index(drop=True)


def _drop_duplicate_interactions(interactions: pd.DataFrame, source: str) -> pd.DataFrame:
    """The same user, item and time twice is a logging artefact; kept, it would put a leave-one-out
    target into its own history (where exclude_history hides it from the ranking)."""
    duplicated = interactions.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first")
    count = int(duplicated.sum())
    if count == 0:
        return interactions
    example = interactions.loc[duplicated, ["user_id", "item_id", "timestamp"]].iloc[0].tolist()
    logger.warning("Dropping %d duplicate interaction row(s) in %s (same user, item and timestamp as an earlier row, "
                   "e.g. user %r, item %r, timestamp %s); the first of each is kept.", count, source, *example)
    return interactions[~duplicated].reset_index(drop=True)
