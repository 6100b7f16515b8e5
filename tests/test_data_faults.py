"""Data faults from the adversarial pass (issue 13): each is a DataError naming the file and the row, never pandas'."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from llmrec.config import DataConfig
from llmrec.data import load_interaction_data
from llmrec.errors import DataError

ITEMS = "item_id,title\n1,A\n2,B\n3,C\n"
HEADER = "user_id,item_id,timestamp\n"


def _load_csv(folder: Path, interactions: str, items: str = ITEMS, **overrides: Any):
    (folder / "inter.csv").write_text(interactions, encoding="utf-8")
    (folder / "items.csv").write_text(items, encoding="utf-8")
    settings = {"path": str(folder), "interactions_file": "inter.csv", "items_file": "items.csv",
                "rating_column": None, "item_text_template": "{title}"}
    settings.update(overrides)
    return load_interaction_data(DataConfig(**settings))


def _error(folder: Path, interactions: str, **overrides: Any) -> str:
    with pytest.raises(DataError) as raised:
        _load_csv(folder, interactions, **overrides)
    return str(raised.value)


@pytest.mark.parametrize("dates, seconds", [
    (["0001-01-01", "2020-01-01", "2020-01-02"], [-62135596800.0, 1577836800.0, 1577923200.0]),
    (["2300-01-01T00:00:00", "2020-01-01", "2020-01-02"], [10413792000.0, 1577836800.0, 1577923200.0]),
], ids=["year-1", "year-2300"])
def test_iso_dates_outside_pandas_nanosecond_range_load(tmp_path: Path, dates: list[str], seconds: list[float]) -> None:
    """Before: pandas.errors.OutOfBoundsDatetime escaped from the epoch subtraction."""
    rows = "".join(f"u1,{item},{date}\n" for item, date in zip((1, 2, 3), dates))
    assert _load_csv(tmp_path, HEADER + rows).interactions["timestamp"] == seconds


def test_parquet_datetimes_outside_nanosecond_range_load(tmp_path: Path) -> None:
    times = pd.Series(pd.to_datetime(["2020-01-01", "2500-06-01", "1500-01-01"]).astype("datetime64[s]"))
    pd.DataFrame({"user_id": ["u1"] * 3, "item_id": [1, 2, 3], "timestamp": times}).to_parquet(tmp_path / "inter.parquet")
    pd.DataFrame({"item_id": [1, 2, 3], "title": ["A", "B", "C"]}).to_parquet(tmp_path / "items.parquet")
    data = load_interaction_data(DataConfig(path=str(tmp_path), interactions_file="inter.parquet",
                                            items_file="items.parquet", rating_column=None, item_text_template="{title}"))
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    expected = [(datetime(*date, tzinfo=timezone.utc) - epoch).total_seconds() for date in ((2020, 1, 1), (2500, 6, 1),
                                                                                          (1500, 1, 1))]
    assert data.interactions["timestamp"] == expected


def test_iso_mixed_with_numbers_names_the_row(tmp_path: Path) -> None:
    message = _error(tmp_path, HEADER + "u1,1,2020-01-01\nu1,2,1600000000\nu1,3,2020-01-03\n")
    assert "inter.csv" in message and "'1600000000' at row 2" in message and "ISO 8601" in message


@pytest.mark.parametrize("value", ["inf", "-inf", "1e999", "Infinity"])
def test_infinite_timestamps_are_refused(tmp_path: Path, value: str) -> None:
    """Before: loaded, and an inf timestamp sorted the interaction after every real one."""
    message = _error(tmp_path, HEADER + f"u1,1,1600000000\nu1,2,{value}\nu1,3,1600000002\n")
    assert "inter.csv" in message and f"infinite value {value!r} at row 2" in message


def test_infinite_rating_is_refused(tmp_path: Path) -> None:
    message = _error(tmp_path, "user_id,item_id,timestamp,rating\nu1,1,1,5\nu1,2,2,inf\n", rating_column="rating")
    assert "column 'rating' has an infinite value 'inf' at row 2" in message


def test_nan_timestamps_are_refused(tmp_path: Path) -> None:
    message = _error(tmp_path, HEADER + "u1,1,1600000000\nu1,2,NaN\n")
    assert "inter.csv" in message and "'NaN' at row 2" in message
    (tmp_path / "inter.jsonl").write_text('{"user_id": "u1", "item_id": 1, "timestamp": 5}\n'
                                          '{"user_id": "u1", "item_id": 2, "timestamp": null}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"inter.jsonl: column 'timestamp' has a non-numeric value \(empty\) at row 2"):
        load_interaction_data(DataConfig(path=str(tmp_path), interactions_file="inter.jsonl", items_file="items.csv",
                                         rating_column=None, item_text_template="{title}"))


@pytest.mark.parametrize("rows, odd, usual", [
    ("u1,1,1600000000\nu1,2,1600000000123\nu1,3,1600000100\n", "'1600000000123' at row 2 looks like milliseconds",
     "'1600000000' at row 1, look like seconds"),
    ("u1,1,1600000000000\nu2,2,1600000000500\nu1,3,1600000100\n", "'1600000100' at row 3 looks like seconds",
     "'1600000000000' at row 1, look like milliseconds"),
    ("u1,1,1600000000000000\nu1,2,1600000000000001\nu1,3,1600000000000\n", "looks like milliseconds",
     "look like microseconds"),
], ids=["ms-among-seconds", "seconds-among-ms", "ms-among-microseconds"])
def test_seconds_mixed_with_milliseconds_are_refused(tmp_path: Path, rows: str, odd: str, usual: str) -> None:
    """Before: loaded, and every millisecond row sorted after every second row."""
    message = _error(tmp_path, HEADER + rows)
    assert "inter.csv" in message and "mixes time units" in message
    assert odd in message and usual in message


@pytest.mark.parametrize("values", [[0, 1, 2], [1, 500, 10**7], [-5, 3, 1600000000], [1.5, 2.5, 1600000000000]],
                         ids=["positions", "small-clock", "one-unit-with-negative", "one-unit-ms"])
def test_one_unit_or_no_epoch_is_accepted(tmp_path: Path, values: list[float]) -> None:
    rows = "".join(f"u1,{item},{value}\n" for item, value in zip((1, 2, 3), values))
    assert _load_csv(tmp_path, HEADER + rows).interactions["timestamp"] == [float(value) for value in values]


def test_latin1_jsonl_read_as_utf8_names_data_encoding(tmp_path: Path) -> None:
    (tmp_path / "inter.jsonl").write_bytes(b'{"user_id": "u1", "item_id": 1, "timestamp": 1}\n'
                                           b'{"user_id": "Andr\xe9", "item_id": 2, "timestamp": 2}\n')
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps({"item_id": i, "title": t}) for i, t in ((1, "A"), (2, "B"))),
                                          encoding="utf-8")
    config = DataConfig(path=str(tmp_path), interactions_file="inter.jsonl", items_file="items.jsonl",
                        rating_column=None, item_text_template="{title}")
    with pytest.raises(DataError) as raised:
        load_interaction_data(config)
    assert "inter.jsonl is not valid utf-8" in str(raised.value) and "(line 2)" in str(raised.value)
    assert "data.encoding" in str(raised.value)
    config.encoding = "latin-1"
    assert load_interaction_data(config).interactions["user_id"] == ["u1", "André"]


@pytest.mark.parametrize("interactions, items, where", [
    ('user_id,item_id,timestamp\nu1,"",1\nu1,2,2\n', ITEMS, "inter.csv: column 'item_id' is empty at row 1"),
    ("user_id,item_id,timestamp\nu1,1,1\nu1,  ,2\n", ITEMS, "inter.csv: column 'item_id' is empty at row 2"),
    (HEADER + "u1,1,1\nu1,2,2\n", 'item_id,title\n1,A\n"",B\n', "items.csv: column 'item_id' is empty at row 2"),
], ids=["quoted-empty", "whitespace", "in-items-file"])
def test_empty_item_id_is_a_data_error(tmp_path: Path, interactions: str, items: str, where: str) -> None:
    """Consistent with empty user ids: a row without an id is refused, naming the file and row."""
    with pytest.raises(DataError, match=where):
        _load_csv(tmp_path, interactions, items)


def test_empty_item_id_in_jsonl_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "inter.jsonl").write_text('{"user_id": "u1", "item_id": 1, "timestamp": 1}\n'
                                          '{"user_id": "u1", "item_id": "", "timestamp": 2}\n'
                                          '{"user_id": "u1", "item_id": null, "timestamp": 3}\n', encoding="utf-8")
    (tmp_path / "items.csv").write_text(ITEMS, encoding="utf-8")
    with pytest.raises(DataError, match=r"inter.jsonl: column 'item_id' is empty at row 2 \(2 row\(s\) without an id\)"):
        load_interaction_data(DataConfig(path=str(tmp_path), interactions_file="inter.jsonl", items_file="items.csv",
                                         rating_column=None, item_text_template="{title}"))
