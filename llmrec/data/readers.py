"""Format-specific readers that turn files on disk into raw pandas tables.

Each reader returns a :class:`RawTables` whose column names are described by a
:class:`ColumnNames`, so that :mod:`llmrec.data.loaders` can validate and canonicalise
every format the same way. Ids and item metadata are read as strings so that ids such
as ``"007"`` survive untouched.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
import warnings
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
# Columns of RecBole's ml-100k.user; the official u.user gets the same names, so one profile template serves both.
MOVIELENS_USER_COLUMNS = ["user_id", "age", "gender", "occupation", "zip_code"]
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
    """Raw interactions and items as read from disk, before validation.

    `users_file` is the layout's own user-attributes file when the folder has one (RecBole
    `{dataset_name}.user`, MovieLens `u.user`); it is only located here and read by the loader.
    Sequence files set `timestamps_are_positions` (each "timestamp" is a position within its user's
    history, not a shared clock), `empty_item_text_is_error` (their items file exists only to give
    text) and, without an items file, `item_text_from_ids`.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    columns: ColumnNames
    interactions_source: str
    items_source: str
    users_file: Optional[Path] = None
    timestamps_are_positions: bool = False
    empty_item_text_is_error: bool = False
    item_text_from_ids: bool = False


_MOVIELENS_COLUMNS = ColumnNames()  # MovieLens readers already name their columns canonically


def require_file(path: Path, what: str, fix: str) -> Path:
    """Fail early with the path and the fix instead of a bare FileNotFoundError deep in pandas."""
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file. {fix}")
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist. {fix}")
    return path


def guess_delimiter(header: str, current: str = ",") -> Optional[str]:
    """The separator a one-column header was probably written with (None if nothing looks like one)."""
    counts = {candidate: header.count(candidate) for candidate in ("::", ";", "\t", "|", ",") if candidate != current}
    if counts.get("::"):
        return "::"
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def delimiter_setting(separator: str) -> str:
    """The setting that selects a separator, written so it survives YAML and the command line."""
    return "data.delimiter: " + ("tab" if separator == "\t" else f"'{separator}'")


def read_text(path: Path, encoding: str = "utf-8", fallback: Optional[str] = None) -> str:
    """Decode a whole file; a wrong encoding names the byte, its offset and line, and data.encoding."""
    raw = path.read_bytes()
    codec = codecs.lookup(encoding).name
    try:  # utf-8-sig: a byte-order mark (Excel exports) must not end up in the first column name
        return raw.decode("utf-8-sig" if codec == "utf-8" else encoding)
    except UnicodeDecodeError as error:
        if fallback is not None:
            logger.info("%s is not valid %s; reading it as %s.", path, encoding, fallback)
            return raw.decode(fallback)
        offset = error.start + (3 if codec == "utf-8" and raw.startswith(codecs.BOM_UTF8) else 0)
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path} is not valid {encoding} text: byte 0x{raw[offset]:02x} at byte offset {offset} (line {line}) "
            f"cannot be decoded. Set data.encoding to the file's encoding (e.g. data.encoding: latin-1, or cp1252 "
            f"for Windows exports), or re-encode it, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
            f"{path.stem}.utf8{path.suffix}`."
        ) from None


def read_delimited(path: Path, separator: str, *, quoting: int = csv.QUOTE_MINIMAL, header: bool = True,
                   names: Optional[list[str]] = None, encoding: str = "utf-8",
                   fallback_encoding: Optional[str] = None) -> pd.DataFrame:
    """Read a delimited text file with every value as a string (empty fields stay "")."""
    text = read_text(path, encoding, fallback_encoding)
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header line and at least one data row.")
    shown_separator = separator
    if separator != "\t" and len(separator) > 1:  # e.g. MovieLens-1M '::' -> tab, read by the fast C parser
        text, separator = text.replace(separator, "\t"), "\t"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            # index_col=False: rows with more fields than the header must not silently become an index
            frame = pd.read_csv(
                io.StringIO(text), sep=separator, dtype=str, keep_default_na=False, quoting=quoting,
                header=0 if header else None, names=names, engine="c", index_col=False,
            )
    except pd.errors.ParserError as error:
        raise DataError(f"{path} could not be parsed as {shown_separator!r}-separated text: {str(error).strip()}."
                        f"{_separator_hint(text, shown_separator)}") from None
    if any(issubclass(warning.category, pd.errors.ParserWarning) for warning in caught):
        _reject_extra_fields(text, separator, quoting, len(frame.columns), path, shown_separator)
    return frame


def _separator_hint(text: str, separator: str) -> str:
    first_line = text.lstrip().split("\n", 1)[0]
    guessed = guess_delimiter(first_line, separator)
    if guessed is not None and separator not in first_line:
        return (f" The first line has no {separator!r} but does have {guessed!r}: is the delimiter {guessed!r}? "
                f"Set {delimiter_setting(guessed)}.")
    return " Check data.delimiter and that values containing the delimiter are quoted."


def _reject_extra_fields(text: str, separator: str, quoting: int, width: int, path: Path, shown_separator: str) -> None:
    """pandas drops fields beyond the header's; fine for a trailing delimiter, data loss otherwise."""
    try:
        reader = csv.reader(io.StringIO(text), delimiter=separator, quoting=quoting)
        for row in reader:
            if len(row) > width and any(field.strip() for field in row[width:]):
                raise DataError(
                    f"{path} line {reader.line_num} has {len(row)} {shown_separator!r}-separated fields but the header "
                    f"has {width}, so values would shift or be lost.{_separator_hint(text, shown_separator)}")
    except csv.Error:  # e.g. a field over csv's size limit; the line number is then unknown
        raise DataError(f"{path} has rows with more {shown_separator!r}-separated fields than its header "
                        f"({width}).{_separator_hint(text, shown_separator)}") from None


def strip_recbole_types(frame: pd.DataFrame) -> pd.DataFrame:
    """RecBole headers look like ``user_id:token``; only the name before ':' matters here."""
    return frame.rename(columns=lambda name: str(name).split(":", 1)[0])


def read_recbole(folder: Path, dataset_name: str, columns: ColumnNames, encoding: str = "utf-8") -> RawTables:
    """RecBole atomic files ``{dataset_name}.inter`` and ``{dataset_name}.item`` (tab-separated, typed header)."""
    fix = f"Check data.path ({folder}) and data.dataset_name ({dataset_name!r})."
    inter_path = require_file(folder / f"{dataset_name}.inter", "RecBole interactions file", fix)
    item_path = require_file(folder / f"{dataset_name}.item", "RecBole item file", fix)
    interactions = strip_recbole_types(read_delimited(inter_path, "\t", quoting=csv.QUOTE_NONE, encoding=encoding))
    items = strip_recbole_types(read_delimited(item_path, "\t", quoting=csv.QUOTE_NONE, encoding=encoding))
    users_path = folder / f"{dataset_name}.user"
    return RawTables(interactions, items, columns, str(inter_path), str(item_path),
                     users_path if users_path.is_file() else None)


def read_recbole_users(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """A RecBole ``.user`` atomic file (tab-separated, typed header such as ``user_id:token``)."""
    return strip_recbole_types(read_delimited(path, "\t", quoting=csv.QUOTE_NONE, encoding=encoding))


def read_movielens_users(path: Path) -> pd.DataFrame:
    """The official ML-100k ``u.user`` (``user id | age | gender | occupation | zip code``, no header).

    Columns get the names of RecBole's ml-100k.user. Like u.item it is read as UTF-8 with a latin-1 fallback.
    """
    return read_delimited(path, "|", quoting=csv.QUOTE_NONE, header=False, names=MOVIELENS_USER_COLUMNS,
                          fallback_encoding="latin-1")


def split_title_year(title: str) -> tuple[str, str]:
    """'Toy Story (1995)' -> ('Toy Story', '1995'); titles without a year come back unchanged with ''."""
    match = _TITLE_YEAR.match(title)
    if match:
        return match.group("title").strip(), match.group("year")
    return title.strip(), ""


def read_movielens(folder: Path) -> RawTables:
    """Official MovieLens-100k (u.data/u.item) or MovieLens-1M (ratings.dat/movies.dat) folder.

    Items are converted to the columns of RecBole's ml-100k.item (item_id, movie_title, release_year,
    class) so that one item-text template serves both layouts. ML-100k's u.user is located for user
    profiles; ML-1M's users.dat is not (its ages and occupations are numeric codes, poor profile text;
    point data.users_file at a decoded copy). The official files are latin-1; they are
    read as UTF-8 first so that a re-encoded copy does not turn 'Café' into 'CafÃ©'.
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
        item_path, "|", quoting=csv.QUOTE_NONE, header=False, fallback_encoding="latin-1",
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
    users_path = folder / "u.user"
    return RawTables(interactions, items, _MOVIELENS_COLUMNS, str(inter_path), str(item_path),
                     users_path if users_path.is_file() else None)


def _read_movielens_1m(folder: Path) -> RawTables:
    inter_path = folder / "ratings.dat"
    item_path = require_file(folder / "movies.dat", "MovieLens item file", "The ml-1m folder must contain movies.dat.")
    interactions = read_delimited(inter_path, "::", quoting=csv.QUOTE_NONE, header=False, fallback_encoding="latin-1",
                                  names=["user_id", "item_id", "rating", "timestamp"])
    raw_items = read_delimited(item_path, "::", quoting=csv.QUOTE_NONE, header=False, fallback_encoding="latin-1",
                               names=["item_id", "title", "genres"])
    rows = []
    for record in raw_items.itertuples(index=False):
        title, year = split_title_year(record.title)
        rows.append((record.item_id.strip(), title, year, " ".join(record.genres.split("|"))))
    items = pd.DataFrame(rows, columns=["item_id", "movie_title", "release_year", "class"], dtype=str)
    return RawTables(interactions, items, _MOVIELENS_COLUMNS, str(inter_path), str(item_path))


def read_table(path: Path, file_format: str, separator: Optional[str] = None, encoding: str = "utf-8") -> pd.DataFrame:
    """One csv/tsv/jsonl/parquet file; text formats are read as strings, parquet keeps its types.

    ``separator`` overrides the csv/tsv default (',' / tab); ``encoding`` applies to the text formats.
    """
    if file_format == "csv":
        return read_delimited(path, separator or ",", encoding=encoding)
    if file_format == "tsv":
        return read_delimited(path, separator or "\t", quoting=csv.QUOTE_NONE, encoding=encoding)
    if file_format == "jsonl":
        return read_json_lines(path, encoding)
    if file_format == "parquet":
        try:
            return pd.read_parquet(path)
        except Exception as error:  # pyarrow raises several unrelated types for corrupt files
            raise DataError(f"{path} could not be read as Parquet: {error}") from None
    raise DataError(f"Unsupported table format {file_format!r} for {path}; use csv, tsv, jsonl or parquet.")


def read_json_lines(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """One JSON object per line; blank lines are skipped."""
    text = read_text(path, encoding)
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
