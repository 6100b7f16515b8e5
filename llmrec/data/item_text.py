"""Render each item's text from its metadata columns with a Python format string.

The text is what the language-model encoder reads, so rendering must be deterministic
across file formats: every value is turned into a string first and missing values
render as "".
"""

from __future__ import annotations

import html
import logging
import math
import re
import string
from typing import Any, Optional

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


def template_fields(template: str, setting: str = "item_text_template", example: str = "{title}") -> list[str]:
    """Column names a template refers to ('{movie_title} ({release_year})' -> ['movie_title', 'release_year']).

    `setting` names the config field the template came from, for the error message.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise DataError(f"data.{setting} {template!r} is not a valid format string: {error}") from None
    fields = []
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        root = field_name.split(".", 1)[0].split("[", 1)[0]
        if root == "" or root.isdigit():
            raise DataError(
                f"data.{setting} {template!r} has a positional field '{{{field_name}}}'; "
                f"every field must name a column of the file, e.g. '{example}'."
            )
        if root not in fields:
            fields.append(root)
    return fields


def format_rows(
    template: str, columns: dict[str, list[Any]], num_rows: int, setting: str, source: str, kind: str
) -> list[str]:
    """`template` filled with each row's values of `columns` (one list per field), whitespace collapsed.

    A row the template cannot format raises a DataError naming `data.<setting>`, the row and its values.
    """
    texts = []
    for row in range(num_rows):
        values = {name: column[row] for name, column in columns.items()}
        try:
            text = template.format_map(values)
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as error:
            raise DataError(
                f"data.{setting} {template!r} failed on row {row + 1} of {source} (values {values}): {error}. "
                f"{kind} columns are strings; drop format specs such as ':d'."
            ) from None
        texts.append(" ".join(text.split()))
    return texts


def render_item_texts(items: pd.DataFrame, template: str, source: str, max_chars: Optional[int] = None, *,
                      unescape_html: bool = True, value_separator: Optional[str] = None,
                      empty_rows_are_errors: Optional[list[str]] = None) -> list[str]:
    """One text per item row; whitespace is collapsed so empty fields leave no double spaces.

    An item whose text renders empty gets its ``item_id`` as text (the encoder needs something to read,
    and an empty input would embed every such item identically), unless ``empty_rows_are_errors`` is
    given: then it holds each row's place in the file ("line 3") and an empty text is a DataError.
    Texts longer than ``max_chars`` characters are cut: the tokenizer keeps only the first
    ``model.max_text_length`` tokens anyway, and a megabyte description per item would otherwise sit in
    memory and in the saved catalogue. Both are logged as warnings with the number of items affected.
    ``unescape_html`` turns HTML character references ("&amp;", "&#9733;") into characters, and
    ``value_separator`` (e.g. "|" in "Action|Adventure") is written as ", " in the text.
    """
    fields = template_fields(template)
    missing = [name for name in fields if name not in items.columns]
    if missing:
        raise DataError(
            f"data.item_text_template refers to column(s) {missing} that {source} does not have; "
            f"available columns: {list(map(str, items.columns))}."
        )
    columns = {name: _field_values(items[name].tolist(), value_separator) for name in fields}
    texts = format_rows(template, columns, len(items), "item_text_template", source, "Item")
    if unescape_html:
        texts = [" ".join(unescape_character_references(text).split()) if "&" in text else text for text in texts]
    empty_rows = [row for row, text in enumerate(texts) if not text]
    item_ids = items["item_id"].tolist() if "item_id" in items.columns else [str(row + 1) for row in range(len(items))]
    if empty_rows_are_errors is not None:
        _reject_items_without_text(columns, texts, item_ids, empty_rows_are_errors, source)
    if empty_rows:
        for row in empty_rows:
            texts[row] = str(item_ids[row])
        logger.warning("%d item(s) in %s render to an empty text with template %r (e.g. item ids %s); their item id "
                       "is used as text instead. Fill in their metadata or change data.item_text_template.",
                       len(empty_rows), source, template, [item_ids[row] for row in empty_rows[:5]])
    if max_chars is not None:
        long_rows = [row for row, text in enumerate(texts) if len(text) > max_chars]
        if long_rows:
            longest = max(len(texts[row]) for row in long_rows)
            for row in long_rows:
                texts[row] = texts[row][:max_chars].rstrip()
            logger.warning("%d item text(s) in %s are longer than data.max_item_text_chars=%d characters (longest: %d); "
                           "they are cut to that length.", len(long_rows), source, max_chars, longest)
    return texts


def _reject_items_without_text(columns: dict[str, list[Any]], texts: list[str], item_ids: list[Any],
                               rows_in_file: list[str], source: str) -> None:
    """An item whose every template field is blank (a template's own words such as 'Genres:' do not count)."""
    blank = [row for row, text in enumerate(texts)
             if not text or (columns and all(not value_to_text(column[row]).strip() for column in columns.values()))]
    if blank:
        row = blank[0]
        raise DataError(f"{source} {rows_in_file[row]}: item {item_ids[row]!r} has no text (its fields {list(columns)} "
                        f"are empty or whitespace-only; {len(blank)} such item(s)). Fill in its metadata, remove the "
                        "row, or change data.item_text_template.")


def _field_values(values: list[Any], separator: Optional[str]) -> list[Any]:
    if separator is None:
        return values
    return [value.replace(separator, ", ") if isinstance(value, str) else value for value in values]


# Only complete references (with the ';'): html.unescape alone would also turn "&not" in "&notes" into "¬es".
_CHARACTER_REFERENCE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


def unescape_character_references(text: str) -> str:
    """'Cats &amp; Dogs &#9733;' -> 'Cats & Dogs ★': scraped titles keep HTML escapes the encoder would read as words."""
    return _CHARACTER_REFERENCE.sub(lambda match: html.unescape(match.group(0)), text)
