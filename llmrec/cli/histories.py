"""The `--histories-file` of `llmrec recommend`: one JSON line per user, checked whole before any answer is written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError, UnknownItemError


def read_histories(path: Path, known_item_ids: set[str]) -> Iterator[tuple[Any, list[str]]]:
    """(user_id, history) per JSONL line; a bad line is reported with its number rather than a batch position.

    Lines are decoded one by one, so that a non-UTF-8 byte is also named by its line.
    """
    if not path.is_file():
        raise DataError(f"Histories file {path} does not exist.")
    with open(path, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path} line {line_number} is not UTF-8 text (byte {error.start + 1} of the line: "
                                f"{error.reason}); save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {line_number} is not valid JSON ({error.msg}).") from None
            history = record.get("history") if isinstance(record, dict) else None
            if not isinstance(history, list):
                raise DataError(
                    f'{path} line {line_number} needs a "history" list, e.g. {{"user_id": "u1", "history": ["50", "172"]}}.'
                )
            history = [str(item_id) for item_id in history]
            unknown = [item_id for item_id in history if item_id not in known_item_ids]
            if unknown:
                raise DataError(f"{path} line {line_number}: {UnknownItemError(unknown)}")
            yield record.get("user_id"), history


def validated_histories(path: Path, known_item_ids: set[str]) -> Iterator[tuple[Any, list[str]]]:
    """Read the whole file once to check every line before any result is written, then stream it again.

    On stdout there is no taking back: an error at line 300 must not come after 256 printed results.
    """
    for _ in read_histories(path, known_item_ids):
        pass
    return read_histories(path, known_item_ids)


def batches(records: Iterator[tuple[Any, list[str]]], size: int) -> Iterator[list[tuple[Any, list[str]]]]:
    """Lists of `size` records (the last one shorter), so recommend_batch sees bounded batches of a long file."""
    batch: list[tuple[Any, list[str]]] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
