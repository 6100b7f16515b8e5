"""Render each item's text from its metadata columns with a Python format string.

The text is what the language-model encoder reads, so rendering must be deterministic
across file formats: every value is turned into a string first and missing values
render as "".
"""

from __future__ import annotations

import logging
import math
import string
from typing import Any

import pandas as pd

from ..errors import DataError

logger = logging.getLogger(__name__)


def value_to_text(value: Any) -> str:
    """Stringify a metadata value so csv, jsonl and parquet render identically (1995.0 -> '1995', NaN -> '')."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):  # lists/arrays: pd.isna is element-wise
        pass
    return str(value)


def template_fields(template: str) -> list[str]:
    """Column names a template refers to ('{movie_title} ({release_year})' -> ['movie_title', 'release_year'])."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise DataError(f"data.item_text_template {template!r} is not a valid format string: {error}") from None
    fields = []
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        root = field_name.split(".", 1)[0].split("[", 1)[0]
        if root == "" or root.isdigit():
            raise DataError(
                f"data.item_text_template {template!r} has a positional field '{{{field_name}}}'; "
                "every field must name an item column, e.g. '{title}'."
            )
        if root not in fields:
            fields.append(root)
    return fields


def render_item_texts(items: pd.DataFrame, template: str, source: str) -> list[str]:
    """One text per item row; whitespace is collapsed so empty fields leave no double spaces."""
    fields = template_fields(template)
    missing = [name for name in fields if name not in items.columns]
    if missing:
        raise DataError(
            f"data.item_text_template refers to column(s) {missing} that {source} does not have; "
            f"available columns: {list(map(str, items.columns))}."
        )
    columns = {name: items[name].tolist() for name in fields}
    texts = []
    for row in range(len(items)):
        values = {name: columns[name][row] for name in fields}
        try:
            text = template.format_map(values)
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as error:
            raise DataError(
                f"data.item_text_template {template!r} failed on row {row + 1} of {source} "
                f"(values {values}): {error}. Item columns are strings; drop format specs such as ':.2f'."
            ) from None
        texts.append(" ".join(text.split()))
    empty = sum(1 for text in texts if not text)
    if empty:
        logger.warning("%d item(s) in %s render to an empty text with template %r.", empty, source, template)
    return texts
