"""Validate and convert the columns of raw tables: ids, numbers and timestamps, naming the file and row at fault.

Rows are counted as data rows from 1 (the header, if any, not counted), as pandas sees them.
"""

from __future__ import annotations

import difflib
import logging
import re
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import DataError
from .item_text import value_to_text
from .readers import delimiter_setting, guess_delimiter

logger = logging.getLogger(__name__)


def _normalised_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _closest_column(name: str, found: list[str]) -> Optional[str]:
    """'userId' for 'user_id', 'ts' never for 'timestamp': case/punctuation-blind match, else a close spelling."""
    by_normalised = {_normalised_name(column): column for column in found}
    target = _normalised_name(name)
    if target in by_normalised:
        return by_normalised[target]
    close = difflib.get_close_matches(target, list(by_normalised), n=1, cutoff=0.6)
    return by_normalised[close[0]] if close else None


def check_columns(frame: pd.DataFrame, wanted: dict[str, str], source: str) -> None:
    """Name the missing columns, what the file has, and the setting to change."""
    found = [str(name) for name in frame.columns]
    missing = {setting: name for setting, name in wanted.items() if name not in frame.columns}
    if not missing:
        return
    if len(found) == 1:  # a whole header in one column: the file uses another separator
        guessed = guess_delimiter(found[0], current="")
        if guessed is not None:
            raise DataError(
                f"{source}: found one column {found[0]!r} — is the delimiter {guessed!r}? Set "
                f"{delimiter_setting(guessed)} (expected columns {list(wanted.values())}).")
    described = ", ".join(f"{name!r} (data.{setting})" for setting, name in missing.items())
    message = (f"{source} is missing column(s) {described}; found columns {found}. "
               f"Set {', '.join(f'data.{setting}' for setting in missing)} to the file's column names.")
    suggestions = [(setting, _closest_column(name, found)) for setting, name in missing.items()]
    suggestions = [f"data.{setting}: {column}" for setting, column in suggestions if column is not None]
    if suggestions:
        message += f" Did you mean {', '.join(suggestions)}?"
    if "timestamp_column" in missing:
        message += " Without timestamps, set data.timestamp_column: null to order interactions by file position."
    raise DataError(message)


def parse_numbers(values: pd.Series, column: str, source: str, fix: str) -> np.ndarray:
    """Numeric column -> finite float64, naming the first bad row instead of pandas' generic error (or none)."""
    if pd.api.types.is_datetime64_any_dtype(values):  # parquet datetimes -> Unix seconds
        numbers = pd.Series(datetimes_to_seconds(values))
    elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values
    else:
        stripped = values.map(lambda value: value.strip() if isinstance(value, str) else value)
        numbers = pd.to_numeric(stripped, errors="coerce")
    bad = np.flatnonzero(pd.isna(numbers).to_numpy())
    if len(bad):
        raise DataError(f"{source}: column {column!r} has a non-numeric value {_shown(values, bad)} "
                        f"(first of {len(bad)} bad row(s), counting data rows from 1). {fix}")
    array = numbers.to_numpy(dtype=np.float64)
    infinite = np.flatnonzero(~np.isfinite(array))  # 'inf', '-inf', '1e999' parse as numbers
    if len(infinite):
        raise DataError(f"{source}: column {column!r} has an infinite value {_shown(values, infinite)} "
                        f"(first of {len(infinite)} such row(s), counting data rows from 1). {fix}")
    return array


def datetimes_to_seconds(dates: pd.Series) -> np.ndarray:
    """Datetimes -> Unix seconds (NaT -> NaN) in the column's own unit.

    pandas keeps s/ms/us units for dates outside 1677-2262, and subtracting a (nanosecond) epoch
    Timestamp would raise OutOfBoundsDatetime for them; numpy's datetime arithmetic does not.
    """
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_convert(None)  # naive UTC
    return (dates.to_numpy() - np.datetime64(0, "s")) / np.timedelta64(1, "s")


def _shown(values: pd.Series, bad_rows: np.ndarray) -> str:
    row = int(bad_rows[0])
    value = values.iloc[row]
    return f"{'(empty)' if value_to_text(value).strip() == '' else repr(value)} at row {row + 1}"


_TIMESTAMP_FIX = ("Timestamps must be numbers such as Unix seconds or ISO 8601 dates/times such as 2020-01-31T12:00:00; "
                  "fix the file, point data.timestamp_column at another column, or set data.timestamp_column: null to "
                  "use file order.")
# Magnitudes of Unix times from 1973 to 2286 in each unit; values outside every band (positions, day counts,
# small test clocks) say nothing about the unit.
_EPOCH_UNITS = (("seconds", 1e8, 1e10), ("milliseconds", 1e11, 1e13), ("microseconds", 1e14, 1e16),
                ("nanoseconds", 1e17, 1e19))


def parse_timestamps(values: pd.Series, column: str, source: str) -> np.ndarray:
    """Numbers (one unit throughout) as they are; a column of ISO 8601 date/time strings -> Unix seconds (naive = UTC)."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return parse_numbers(values, column, source, _TIMESTAMP_FIX)
    if pd.api.types.is_numeric_dtype(values):
        return _check_one_unit(parse_numbers(values, column, source, _TIMESTAMP_FIX), values, column, source)
    stripped = values.map(lambda value: value.strip() if isinstance(value, str) else value)
    numbers = pd.to_numeric(stripped, errors="coerce")
    not_numbers = pd.isna(numbers).to_numpy()
    if not not_numbers.any():
        return _check_one_unit(parse_numbers(values, column, source, _TIMESTAMP_FIX), values, column, source)
    texts = stripped.map(lambda value: value if isinstance(value, str) else "")
    dates = pd.to_datetime(texts, format="ISO8601", utc=True, errors="coerce")
    not_dates = pd.isna(dates).to_numpy()
    if not not_dates.any():
        logger.info("%s: column %r holds ISO 8601 dates/times; converted to Unix seconds (naive times read as UTC).",
                    source, column)
        return datetimes_to_seconds(dates).astype(np.float64)
    looks_like_dates = not_dates.sum() < not_numbers.sum()  # report against the form most rows use
    bad = np.flatnonzero(not_dates if looks_like_dates else not_numbers)
    kind = "an ISO 8601 date/time like the other rows" if looks_like_dates else "a number"
    raise DataError(f"{source}: column {column!r} has {_shown(values, bad)}, which is not {kind} "
                    f"(first of {len(bad)} bad row(s), counting data rows from 1). {_TIMESTAMP_FIX}")


def _check_one_unit(seconds: np.ndarray, values: pd.Series, column: str, source: str) -> np.ndarray:
    """Unix times in two units (e.g. seconds and milliseconds) in one column would order interactions wrongly."""
    magnitudes = np.abs(seconds)
    bands = [(name, np.flatnonzero((magnitudes >= low) & (magnitudes < high))) for name, low, high in _EPOCH_UNITS]
    bands = [(name, rows) for name, rows in bands if len(rows)]
    if len(bands) < 2:
        return seconds
    bands.sort(key=lambda band: -len(band[1]))
    (usual, usual_rows), (odd, odd_rows) = bands[0], bands[1]
    raise DataError(f"{source}: column {column!r} mixes time units: {_shown(values, odd_rows)} looks like "
                    f"{odd} since 1970 ({len(odd_rows)} such row(s)), while most rows, e.g. "
                    f"{_shown(values, usual_rows)}, look like {usual} (counting data rows from 1). Convert the "
                    "column to one unit, e.g. divide the millisecond values by 1000.")


def parse_ids(values: pd.Series, column: str, source: str) -> pd.Series:
    ids = values.map(value_to_text).str.strip()
    empty = np.flatnonzero((ids == "").to_numpy())
    if len(empty):
        raise DataError(f"{source}: column {column!r} is empty at row {int(empty[0]) + 1} "
                        f"({len(empty)} row(s) without an id); every row needs an id.")
    return ids.astype(str)
