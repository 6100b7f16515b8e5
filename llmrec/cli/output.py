"""How commands print their answers: aligned tables for people, JSON (`--json`) for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ..recommender import Recommender

TEXT_WIDTH = 48  # item texts are cut to this in tables


def short_text(text: str, width: int = TEXT_WIDTH) -> str:
    """One line of at most `width` characters, so a long item text does not break a table's columns."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], stream: TextIO | None = None) -> None:
    """Aligned plain-text columns; numbers are right-aligned with 4 decimals, so tables diff cleanly."""
    stream = stream or sys.stdout
    cells = [[f"{value:.4f}" if isinstance(value, float) else str(value) for value in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(row[column], (int, float)) for row in rows) for column in range(len(headers))]
    widths = [max([len(header), *(len(row[column]) for row in cells)]) for column, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [value.rjust(width) if is_number else value.ljust(width) for value, width, is_number in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    print(line(headers), file=stream)
    for row in cells:
        print(line(row), file=stream)


def print_json(obj: Any) -> None:
    """Indented and with non-ASCII item texts kept as they are, for people who read `--json` too."""
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def ranked_records(ranked: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
    """One record per item; `"reserved": true/false` too when slots were held for new items (`--new-items`)."""
    return [{"item_id": item[0], "score": item[1], **({"reserved": item.reserved} if hasattr(item, "reserved") else {})}
            for item in ranked]


def print_ranked(recommender: "Recommender", ranked: Sequence[tuple[str, float]], as_json: bool) -> None:
    """Ranked (item id, score) pairs as JSON records, or as a table that also shows each item's text."""
    if as_json:
        print_json(ranked_records(ranked))
        return
    texts = item_texts(recommender)
    print_table(
        ["rank", "item_id", "score", "text"],
        [(rank, item_id, score, short_text(texts.get(item_id, ""))) for rank, (item_id, score) in enumerate(ranked, start=1)],
    )


def item_texts(recommender: "Recommender") -> dict[str, str]:
    """Item id -> text of the model's catalogue, for the text column of tables."""
    return dict(zip(recommender.item_ids, recommender.item_texts))
