"""Sequence files: one line per user, the user id then that user's item ids oldest first, whitespace-separated.

This is the layout the SASRec, BERT4Rec, gSASRec, LlamaRec and P5 code bases publish (e.g. ML-1M's
``sequences.txt``). The files carry no timestamps, so each interaction's position within its user's line
(0, 1, 2, ...) stands in for one: leave-one-out, cold-item and cold-user splits only need each user's order.
Item text comes from an optional items file (csv/tsv/jsonl/parquet) keyed by ``data.item_column``.
"""

from __future__ import annotations

import logging
import re
from itertools import chain
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import DataError
from .readers import ColumnNames, RawTables, read_text

logger = logging.getLogger(__name__)

SEQUENCES_FILE_NAME = "sequences.txt"
# Looked for next to the sequence file when data.items_file is not set, in this order.
ITEMS_FILE_NAMES = ("items.tsv", "items.csv", "items.jsonl", "items.parquet")
_USER, _POSITION = "user_id", "position_in_sequence"  # column names of the interactions table built here
_HEADER_WORDS = {"user", "userid", "uid", "users", "sessionid", "session"}


def looks_like_sequence_file(path: Path) -> bool:
    """For data.format auto: sequences.txt by name, or a .txt file whose first line has no tab or comma.

    A tab-separated .txt stays a tsv table, and a .txt with commas goes to the sequence reader, which then
    explains that the file is really CSV.
    """
    if path.name == SEQUENCES_FILE_NAME:
        return True
    if path.suffix.lower() != ".txt":
        return False
    with path.open("rb") as handle:
        first_line = handle.readline(65536)
    return b"\t" not in first_line and b"," not in first_line


def default_items_file(folder: Path) -> Optional[Path]:
    """The items file published beside a sequence file (items.tsv etc.), if there is one."""
    return next((folder / name for name in ITEMS_FILE_NAMES if (folder / name).is_file()), None)


def read_sequence_file(path: Path, encoding: str = "utf-8", user_column: str = "user_id",
                       item_column: str = "item_id") -> pd.DataFrame:
    """Interactions (user_id, `item_column`, position_in_sequence) in file order; positions count from 0 per user.

    Blank lines are skipped. A line with a user id but no items, a user id on two lines, a comma-separated
    (CSV) file, a header line and NUL bytes raise :class:`DataError` naming the file and line.
    """
    text = read_text(path, encoding)
    if not text.strip():
        raise DataError(f"{path} is empty; a sequence file needs one line per user: the user id, then that user's "
                        "item ids oldest first, separated by spaces.")
    user_ids: list[str] = []
    item_lists: list[list[str]] = []
    line_of_user: dict[str, int] = {}
    for line_number, line in enumerate(text.split("\n"), start=1):
        tokens = line.split()
        if not tokens:
            continue
        _check_line(path, line_number, line, tokens, user_column)
        user_id = tokens[0]
        if user_id in line_of_user:
            raise DataError(f"{path} line {line_number}: user id {user_id!r} already has a line (line "
                            f"{line_of_user[user_id]}); a sequence file has one line per user with the whole history. "
                            "Merge the two lines (oldest items first).")
        line_of_user[user_id] = line_number
        user_ids.append(user_id)
        item_lists.append(tokens[1:])
    lengths = np.fromiter((len(items) for items in item_lists), dtype=np.int64, count=len(item_lists))
    positions = np.arange(int(lengths.sum()), dtype=np.float64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    frame = pd.DataFrame({_USER: np.repeat(np.asarray(user_ids, dtype=object), lengths), _POSITION: positions})
    # Named like the items file's id column, so that the loader reads both tables with one ColumnNames.
    frame[item_column] = np.fromiter(chain.from_iterable(item_lists), dtype=object, count=int(lengths.sum()))
    return frame


def _check_line(path: Path, line_number: int, line: str, tokens: list[str], user_column: str) -> None:
    where = f"{path} line {line_number}"
    if "\x00" in line:
        raise DataError(f"{where} contains a NUL byte; this is not a text sequence file (binary or corrupt?). "
                        "Check data.path and data.format.")
    if "," in line:
        raise DataError(f"{where} has commas ({line.strip()[:60]!r}): this looks like a CSV file, not a sequence file "
                        "(one line per user: the user id, then item ids separated by spaces). For a table with one "
                        "row per interaction, set data.format: csv with data.interactions_file.")
    if line_number == 1 and _normalised(tokens[0]) in _HEADER_WORDS | {_normalised(user_column)}:
        raise DataError(f"{where} looks like a header ({line.strip()[:60]!r}); sequence files have none. Remove the "
                        "line, or set data.format to csv/tsv if the file is a table of interactions.")
    if len(tokens) == 1:
        raise DataError(f"{where}: user {tokens[0]!r} has no items; each line needs the user id followed by at least "
                        "one item id. Remove the line or add the user's items.")


def _normalised(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def read_sequences(sequence_path: Path, items_path: Optional[Path], items: Optional[pd.DataFrame],
                   encoding: str = "utf-8", user_column: str = "user_id", item_column: str = "item_id") -> RawTables:
    """RawTables for a sequence file; without an items file every item's text is its id (logged)."""
    if item_column in (_USER, _POSITION):
        raise DataError(f"data.item_column {item_column!r} clashes with a column llmrec builds from {sequence_path}; "
                        "rename the items file's id column.")
    interactions = read_sequence_file(sequence_path, encoding, user_column, item_column)
    columns = ColumnNames(user=_USER, item=item_column, timestamp=_POSITION, rating=None)
    if items is None:
        logger.warning("No items file for %s (data.items_file is not set and there is no %s beside it): item texts "
                       "are the item ids, so the text encoder has nothing to read. Point data.items_file at the "
                       "item titles.", sequence_path, " / ".join(ITEMS_FILE_NAMES))
        items = pd.DataFrame({item_column: pd.unique(interactions[item_column])})
        return RawTables(interactions, items, columns, str(sequence_path), str(sequence_path),
                         timestamps_are_positions=True, item_text_from_ids=True)
    return RawTables(interactions, items, columns, str(sequence_path), str(items_path),
                     timestamps_are_positions=True, empty_item_text_is_error=True)
