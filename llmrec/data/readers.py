"""Format-specific readers that turn files on disk into raw pandas tables.

Each reader returns a :class:`RawTables` whose column names are described by a
:class:`ColumnNames`, so that :mod:`llmrec.data.loaders` can validate and canonicalise
every format the same way. Ids and item metadata are read as strings so that ids such
as ``"007"`` survive untouched.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from ..errors import DataError

logger = logging.getLogger(__name__)

MOVIELENS_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
_RELEASE_DATE_YEAR = re.compile(r"(\d{4})\s*$")


@dataclass(frozen=True)
class ColumnNames:
    """Where the canonical fields live in a raw table (None = the file has no such column)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: Optional[str] = "timestamp"
    rating: Optional[str] = "rating"


@dataclass
class RawTables:
    """Raw interactions and items as read from disk, before validation."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    columns: ColumnNames
    interactions_source: str
    items_source: str


_MOVIELENS_COLUMNS = ColumnNames()  # MovieLens readers already name their columns canonically


def require_file(path: Path, what: str, fix: str) -> Path:
    """Fail early with the path and the fix instead of a bare FileNotFoundError deep in pandas."""
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist. {fix}")
    return path


def read_delimited(path: Path, separator: str, *, quoting: int = csv.QUOTE_MINIMAL, header: bool = True,
                   names: Optional[list[str]] = None, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a delimited text file with every value as a string (empty fields stay "")."""
    try:  # utf-8-sig: a byte-order mark (Excel exports) must not end up in the first column name
        text = path.read_text(encoding="utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not valid UTF-8 (bad byte at position {error.start}). Re-encode it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`."
        ) from None
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header line and at least one data row.")
    if separator != "\t" and len(separator) > 1:  # e.g. MovieLens-1M '::' -> tab, read by the fast C parser
        text, separator = text.replace(separator, "\t"), "\t"
    try:
        return pd.read_csv(
            io.StringIO(text), sep=separator, dtype=str, keep_default_na=False, quoting=quoting,
            header=0 if header else None, names=names, engine="c",
        )
    except pd.errors.ParserError as error:
        raise DataError(f"{path} could not be parsed as '{separator!r}'-separated text: {error}") from None


def strip_recbole_types(frame: pd.DataFrame) -> pd.DataFrame:
    """RecBole headers look like ``user_id:token``; only the name before ':' matters here."""
    return frame.rename(columns=lambda name: str(name).split(":", 1)[0])


def read_recbole(folder: Path, dataset_name: str, columns: ColumnNames) -> RawTables:
    """RecBole atomic files ``{dataset_name}.inter`` and ``{dataset_name}.item`` (tab-separated, typed header)."""
    fix = f"Check data.path ({folder}) and data.dataset_name ({dataset_name!r})."
    inter_path = require_file(folder / f"{dataset_name}.inter", "RecBole interactions file", fix)
    item_path = require_file(folder / f"{dataset_name}.item", "RecBole item file", fix)
    interactions = strip_recbole_types(read_delimited(inter_path, "\t", quoting=csv.QUOTE_NONE))
    items = strip_recbole_types(read_delimited(item_path, "\t", quoting=csv.QUOTE_NONE))
    return RawTables(interactions, items, columns, str(inter_path), str(item_path))


def split_title_year(title: str) -> tuple[str, str]:
    """'Toy Story (1995)' -> ('Toy Story', '1995'); titles without a year come back unchanged with ''."""
    match = _TITLE_YEAR.match(title)
    if match:
        return match.group("title").strip(), match.group("year")
    return title.strip(), ""


def read_movielens(folder: Path) -> RawTables:
    """Official MovieLens-100k (u.data/u.item) or MovieLens-1M (ratings.dat/movies.dat) folder.

    Items are converted to the columns of RecBole's ml-100k.item (item_id, movie_title, release_year,
    class) so that one item-text template serves both layouts.
    """
    if (folder / "u.data").is_file():
        return _read_movielens_100k(folder)
    if (folder / "ratings.dat").is_file():
        return _read_movielens_1m(folder)
    raise DataError(
        f"{folder} is not a MovieLens folder: it has neither u.data (ML-100k) nor ratings.dat (ML-1M). "
        "Point data.path at the unzipped ml-100k folder."
    )


def _read_movielens_100k(folder: Path) -> RawTables:
    inter_path = folder / "u.data"
    item_path = require_file(folder / "u.item", "MovieLens item file", "The ml-100k folder must contain u.item.")
    interactions = read_delimited(inter_path, "\t", quoting=csv.QUOTE_NONE, header=False,
                                  names=["user_id", "item_id", "rating", "timestamp"])
    flag_names = [f"genre_{index}" for index in range(len(MOVIELENS_GENRES))]
    raw_items = read_delimited(
        item_path, "|", quoting=csv.QUOTE_NONE, header=False, encoding="latin-1",
        names=["item_id", "title", "release_date", "video_release_date", "url", *flag_names],
    )
    rows = []
    for record in raw_items.itertuples(index=False):
        title, year = split_title_year(record.title)
        if not year:
            date_match = _RELEASE_DATE_YEAR.search(record.release_date)
            year = date_match.group(1) if date_match else ""
        flags = [getattr(record, name) for name in flag_names]
        genres = " ".join(genre for genre, flag in zip(MOVIELENS_GENRES, flags) if flag.strip() == "1")
        rows.append((record.item_id.strip(), title, year, genres))
    items = pd.DataFrame(rows, columns=["item_id", "movie_title", "release_year", "class"], dtype=str)
    return RawTables(interactions, items, _MOVIELENS_COLUMNS, str(inter_path), str(item_path))


def _read_movielens_1m(folder: Path) -> RawTables:
    inter_path = folder / "ratings.dat"
    item_path = require_file(folder / "movies.dat", "MovieLens item file", "The ml-1m folder must contain movies.dat.")
    interactions = read_delimited(inter_path, "::", quoting=csv.QUOTE_NONE, header=False, encoding="latin-1",
                                  names=["user_id", "item_id", "rating", "timestamp"])
    raw_items = read_delimited(item_path, "::", quoting=csv.QUOTE_NONE, header=False, encoding="latin-1",
                               names=["item_id", "title", "genres"])
    rows = []
    for record in raw_items.itertuples(index=False):
        title, year = split_title_year(record.title)
        rows.append((record.item_id.strip(), title, year, " ".join(record.genres.split("|"))))
    items = pd.DataFrame(rows, columns=["item_id", "movie_title", "release_year", "class"], dtype=str)
    return RawTables(interactions, items, _MOVIELENS_COLUMNS, str(inter_path), str(item_path))


def read_table(path: Path, file_format: str) -> pd.DataFrame:
    """One csv/tsv/jsonl/parquet file; text formats are read as strings, parquet keeps its types."""
    if file_format == "csv":
        return read_delimited(path, ",")
    if file_format == "tsv":
        return read_delimited(path, "\t", quoting=csv.QUOTE_NONE)
    if file_format == "jsonl":
        return read_json_lines(path)
    if file_format == "parquet":
        try:
            return pd.read_parquet(path)
        except Exception as error:  # pyarrow raises several unrelated types for corrupt files
            raise DataError(f"{path} could not be read as Parquet: {error}") from None
    raise DataError(f"Unsupported table format {file_format!r} for {path}; use csv, tsv, jsonl or parquet.")


def read_json_lines(path: Path) -> pd.DataFrame:
    """One JSON object per line; blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not valid UTF-8 (bad byte at position {error.start}); re-encode it as UTF-8.") from None
    if not text.strip():
        raise DataError(f"{path} is empty; it needs at least one JSON object per line.")
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:  # json + DataFrame instead of pd.read_json, which turns 'timestamp' columns into dates
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {line_number} is not valid JSON ({error.msg}); "
                            "JSON Lines files need one JSON object per line.") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {line_number} is a JSON {type(record).__name__}, not an object.")
        records.append(record)
    return pd.DataFrame.from_records(records)
