"""Fuzz the data loaders: any file either loads into consistent tables or raises a DataError/ConfigError naming it.

Generated CSV/TSV/JSONL/sequence/Parquet files mix plausible rows with hostile ones (random bytes, other delimiters,
duplicate or missing headers, NUL bytes, huge and non-finite numbers, unicode, quotes and line breaks in
values, empty files). Bounded so the whole module runs in seconds.
"""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmrec.config import DataConfig
from llmrec.data import build_split, load_interaction_data
from llmrec.errors import ConfigError, DataError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)  # derandomized: CI sees the same examples every run

SPECIAL_CELLS = ["", " ", "nan", "NaN", "inf", "-inf", "1e999", "9" * 40, "1600000000", "1600000000000", "2020-01-01",
                 "2020-01-01T10:00:00+02:00", "0001-01-01", "99999-01-01", "\x00", '"', '""', "a,b", "a\tb", "a\nb",
                 "a\r\nb", "Café", "💥", "\ud800", "&amp;", "{title}", "null", "-0", "0x1F", "1_000", "user_id"]
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)  # no lone surrogates: not encodable
HOSTILE_CELL = st.one_of(st.sampled_from(SPECIAL_CELLS), TEXT, st.integers(min_value=-10**25, max_value=10**25).map(str),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr))
# Mostly values a real file has, so that most examples get past the first check and reach the deeper ones.
PLAUSIBLE_CELLS = {
    "user_id": st.sampled_from(["u1", "u2", "u3", "7"]), "item_id": st.sampled_from(["1", "2", "3", "4", "007"]),
    "timestamp": st.integers(0, 2000).map(str) | st.sampled_from(["1600000000", "2020-01-01", "1.5"]),
    "rating": st.sampled_from(["1", "3", "5", "4.5"]), "title": st.sampled_from(["Heat", "Café", "A &amp; B", "x"]) | TEXT,
    "genres": st.sampled_from(["Action|Crime", "Comedy", ""]),
}
COLUMN = st.sampled_from(["user_id", "item_id", "timestamp", "rating", "title", "genres", "text", "", "user_id:token",
                          "Item_ID", "é"]) | st.text(max_size=5)
DELIMITER = st.sampled_from([",", "\t", ";", "|", " ", "::"])
TEMPLATE = st.sampled_from(["{title}", "{title}", "{title} {genres}", "{item_id}", "{missing}", "{", "{0}", "{title:d}"])


def cell(draw: st.DrawFn, column: str) -> str:
    """A plausible value for the column nine times in ten, else a hostile one."""
    if column in PLAUSIBLE_CELLS and draw(st.integers(0, 9)) > 0:
        return draw(PLAUSIBLE_CELLS[column])
    return draw(HOSTILE_CELL)


def _about_a_line(message: str) -> bool:
    """Whether the message places the fault at a line (generic phrases such as 'one line per user' do not)."""
    generic = re.sub(r"one line per user|per line|line breaks|JSON Lines|header line|each line|the line", "", message)
    return re.search(r"\bline\b", generic) is not None


def _load_or_named_error(files: dict[str, bytes], config_for: Callable[[Path], DataConfig]) -> None:
    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        for name, content in files.items():
            (folder / name).write_bytes(content)
        config = config_for(folder)
        try:
            data = load_interaction_data(config)
        except ConfigError as error:
            assert "data." in str(error), error
            return
        except DataError as error:
            message = str(error)
            assert any(name in message for name in files) or "data.item_text_template" in message, message
            if _about_a_line(message):
                assert re.search(r"line \d+|first line", message), message
            return
        _assert_consistent(data)
        try:
            build_split(data, config)
        except DataError:
            pass  # e.g. nobody has 3 interactions; its message is covered by test_bad_inputs


def _assert_consistent(data: Any) -> None:
    user_ids, item_ids = data.interactions["user_id"], data.interactions["item_id"]
    assert all(isinstance(value, str) and value and value == value.strip() for value in [*user_ids, *item_ids])
    assert set(item_ids) <= set(data.items["item_id"])
    assert len(data.items) >= 2 and len(set(data.items["item_id"])) == len(data.items)
    assert all(math.isfinite(value) for value in data.interactions["timestamp"])
    assert all(text and text == " ".join(text.split()) for text in data.items["text"])


@st.composite
def delimited_file(draw: st.DrawFn, wanted: list[str]) -> bytes:
    """Usually the wanted header and rows of mostly plausible cells; sometimes odd headers, widths or bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=120))
    header = list(wanted) if kind > 2 else draw(st.lists(COLUMN, min_size=0, max_size=5))
    separator = draw(DELIMITER) if kind == 1 else ("\t" if "genres" in wanted else ",")
    ragged = kind == 2
    rows = [[cell(draw, column) for column in header] + (draw(st.lists(HOSTILE_CELL, max_size=1)) if ragged else [])
            for _ in range(draw(st.integers(0, 7)))]
    newline = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    text = newline.join(separator.join(row) for row in [header, *rows]) + draw(st.sampled_from(["", newline]))
    prefix = draw(st.sampled_from(["", "", "\ufeff"]))
    return (prefix + text).encode(draw(st.sampled_from(["utf-8"] * 8 + ["latin-1", "utf-16"])), errors="replace")


JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | HOSTILE_CELL,
                          lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
                          max_leaves=4)


@st.composite
def json_lines_file(draw: st.DrawFn, wanted: list[str]) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=120))
    lines = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.integers(0, 19))
        if kind == 0:
            lines.append(draw(st.sampled_from(["", "[1, 2]", "{", "null", '"text"', "{'a': 1}", "NaN"])))
            continue
        keys = wanted if kind > 2 else draw(st.lists(COLUMN, max_size=4))
        record = {key: (int(value) if value.isascii() and value.isdigit() and draw(st.booleans()) else value)
                  for key in keys for value in [cell(draw, key)]}
        if kind == 1:
            record[draw(st.sampled_from(keys or ["x"]))] = draw(JSON_VALUE)
        lines.append(json.dumps(record, allow_nan=True))
    return "\n".join(lines).encode("utf-8")


@st.composite
def sequence_file(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=120))
    token = st.sampled_from(["1", "2", "3", "4", "007"])
    if kind == 1:
        token = token | st.sampled_from(["user_id", ",", "1,2", "\x00", "é", "💥"]) | st.text(
            alphabet=st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")), min_size=1, max_size=4)
    users = st.sampled_from(["u1", "u2", "u3", "u4", "u5"]) if kind > 2 else token
    lines = [[draw(users), *draw(st.lists(token, max_size=6))] for _ in range(draw(st.integers(0, 8)))]
    spacing = draw(st.sampled_from([" ", " ", "\t", "  ", " \t "]))
    blank = draw(st.sampled_from(["", "", "\n", "\n \n"]))
    return (blank + "\n".join(spacing.join(line) for line in lines)).encode("utf-8")


OPTIONAL_COLUMNS = st.fixed_dictionaries({"timestamp_column": st.sampled_from(["timestamp", None]),
                                          "rating_column": st.sampled_from(["rating", None])})


@FUZZ
@given(interactions=delimited_file(["user_id", "item_id", "timestamp", "rating"]),
       items=delimited_file(["item_id", "title", "genres"]), table_format=st.sampled_from(["csv", "tsv", "auto"]),
       delimiter=st.sampled_from([None, None, ";", "tab", "|"]), columns=OPTIONAL_COLUMNS, template=TEMPLATE)
def test_fuzzed_csv_and_tsv_load_or_name_the_file(interactions: bytes, items: bytes, table_format: str,
                                                  delimiter: str | None, columns: dict, template: str) -> None:
    extension = "tsv" if table_format == "tsv" else "csv"
    _load_or_named_error(
        {f"inter.{extension}": interactions, f"items.{extension}": items},
        lambda folder: DataConfig(format=table_format, path=str(folder), interactions_file=f"inter.{extension}",
                                  items_file=f"items.{extension}", delimiter=delimiter, item_text_template=template,
                                  **columns))


@FUZZ
@given(interactions=json_lines_file(["user_id", "item_id", "timestamp", "rating"]),
       items=json_lines_file(["item_id", "title", "genres"]), columns=OPTIONAL_COLUMNS, template=TEMPLATE)
def test_fuzzed_json_lines_load_or_name_the_file(interactions: bytes, items: bytes, columns: dict, template: str) -> None:
    _load_or_named_error(
        {"inter.jsonl": interactions, "items.jsonl": items},
        lambda folder: DataConfig(path=str(folder), interactions_file="inter.jsonl", items_file="items.jsonl",
                                  item_text_template=template, **columns))


@FUZZ
@given(sequences=sequence_file(), items=delimited_file(["item_id", "title", "genres"]),
       table_format=st.sampled_from(["sequences", "auto"]), with_items=st.booleans(), template=TEMPLATE)
def test_fuzzed_sequence_files_load_or_name_the_file(sequences: bytes, items: bytes, table_format: str,
                                                     with_items: bool, template: str) -> None:
    files = {"sequences.txt": sequences, "items.tsv": items} if with_items else {"sequences.txt": sequences}
    _load_or_named_error(files, lambda folder: DataConfig(format=table_format, path=str(folder),
                                                          item_text_template=template))


@FUZZ
@given(content=st.binary(max_size=200) | TEXT.map(lambda text: text.encode("utf-8")),
       name=st.sampled_from(["inter.csv", "inter.tsv", "inter.jsonl", "inter.txt", "inter.parquet", "sequences.txt"]))
def test_fuzzed_bytes_as_interactions_name_the_file(content: bytes, name: str) -> None:
    """Whatever the bytes, a file named like each format (parquet included) loads or is named in the error."""
    _load_or_named_error({name: content, "items.csv": b"item_id,title\n1,A\n2,B\n"},
                         lambda folder: DataConfig(path=str(folder), interactions_file=name, items_file="items.csv",
                                                   item_text_template="{title}", rating_column=None))


PARQUET_COLUMN = st.one_of(
    st.lists(st.integers(-2**63, 2**63 - 1), min_size=3, max_size=3).map(lambda values: pd.Series(values, dtype="int64")),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3).map(
        lambda values: pd.Series(values, dtype="float64")),
    st.lists(st.none() | PLAUSIBLE_CELLS["item_id"] | TEXT, min_size=3, max_size=3).map(
        lambda values: pd.Series(values, dtype=object)),
    st.lists(st.booleans(), min_size=3, max_size=3).map(pd.Series),
    st.lists(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 1, 1)), min_size=3, max_size=3).map(
        lambda values: pd.Series(values).astype("datetime64[us]")),
)


@FUZZ
@given(interactions=st.dictionaries(st.sampled_from(["user_id", "item_id", "timestamp", "rating", "x"]), PARQUET_COLUMN,
                                    min_size=1),
       items=st.dictionaries(st.sampled_from(["item_id", "title", "genres"]), PARQUET_COLUMN, min_size=1),
       columns=OPTIONAL_COLUMNS)
def test_fuzzed_parquet_columns_load_or_name_the_file(interactions: dict, items: dict, columns: dict) -> None:
    """Parquet keeps its types: integers, floats with inf/NaN, bools, nulls and dates far outside 1677-2262."""
    files = {}
    for name, table in (("inter.parquet", interactions), ("items.parquet", items)):
        buffer = io.BytesIO()
        pd.DataFrame(table).to_parquet(buffer)
        files[name] = buffer.getvalue()
    _load_or_named_error(files, lambda folder: DataConfig(path=str(folder), interactions_file="inter.parquet",
                                                          items_file="items.parquet", item_text_template="{title}",
                                                          **columns))
