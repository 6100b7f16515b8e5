"""Load interactions, item metadata and user attributes from any supported layout into one canonical form.

Whatever the source (RecBole atomic files, the official MovieLens folder, csv/tsv/jsonl/parquet),
the result has the same columns, so splitting, training and evaluation never care where the
data came from. Every bad input raises :class:`llmrec.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import DataError
from .item_text import render_item_texts, value_to_text
from .readers import (ColumnNames, RawTables, delimiter_setting, guess_delimiter, read_movielens, read_movielens_users,
                      read_recbole, read_recbole_users, read_table)
from .user_text import render_user_profiles

logger = logging.getLogger(__name__)

BUNDLED_DATASET_NAME = "ml-100k"
_TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
_EXTENSION_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
}


@dataclass
class InteractionData:
    """Canonical interactions (user_id, item_id, timestamp[, rating], in file order) and items (item_id, text, ...).

    `users` (user_id, profile, attribute columns) is there when a users file was read; `profile` is ""
    for a user whose profile rendered empty. `users_note` says why there is none otherwise.
    """

    interactions: datasets.Dataset
    items: datasets.Dataset
    users: Optional[datasets.Dataset] = None
    users_note: Optional[str] = None

    @property
    def user_profiles(self) -> dict[str, str]:
        """User id -> profile text, for the users that have one (a user without a row has none)."""
        if self.users is None:
            return {}
        return {user_id: profile for user_id, profile in zip(self.users["user_id"], self.users["profile"]) if profile}


def load_interaction_data(config: DataConfig) -> InteractionData:
    """Read the data the config points at (default: MovieLens-100k from the RecBole wheel).

    What happens to imperfect input (each logged as a warning naming the file and the count):
    interactions whose item has no row in the items file are dropped (an error if that is all of them);
    rows repeating the same user, item and timestamp are dropped, keeping the first; items whose text
    renders empty get their item id as text; texts longer than ``data.max_item_text_chars`` are cut.
    Timestamps may be numbers (e.g. Unix seconds) or ISO 8601 dates/times (naive ones read as UTC).
    Anything else wrong raises :class:`DataError` naming the file, row or column and the fix.

    User profiles come from ``data.users_file``, else from the layout's own users file (RecBole
    ``{dataset_name}.user``, MovieLens ``u.user``), rendered with ``data.user_profile_template``. A file named
    in the config must be usable (:class:`DataError` otherwise); one found next to the data that does not fit
    the template is skipped with a warning, so that data sets whose users file nobody asked for still load.
    """
    config.validate()
    raw = _read_raw_tables(config)
    interactions = _canonical_interactions(raw)
    items = _canonical_items(raw, config.item_text_template, config.max_item_text_chars)
    interactions = _apply_rating_threshold(interactions, config.rating_threshold, raw.interactions_source)
    interactions = _drop_unknown_items(interactions, items, raw)
    interactions = _drop_duplicate_interactions(interactions, raw.interactions_source)
    if len(items) < 2:  # checked last so that a more specific problem with the files is reported first
        raise DataError(f"{raw.items_source} describes only {len(items)} item ({items['item_id'].tolist()}); "
                        "with a catalogue of one there is nothing to recommend or rank. Point data.items_file "
                        "(or data.path) at the full item catalogue.")
    logger.info(
        "Loaded %d interactions from %d users over %d items (%s).",
        len(interactions), interactions["user_id"].nunique(), len(items), raw.interactions_source,
    )
    interaction_features = {"user_id": datasets.Value("string"), "item_id": datasets.Value("string"),
                            "timestamp": datasets.Value("float64")}
    if "rating" in interactions.columns:
        interaction_features["rating"] = datasets.Value("float64")
    item_features = {name: datasets.Value("string") for name in items.columns}
    users, users_note = _load_users(config, raw)
    return InteractionData(
        interactions=datasets.Dataset.from_pandas(
            interactions, preserve_index=False, features=datasets.Features(interaction_features)),
        items=datasets.Dataset.from_pandas(items, preserve_index=False, features=datasets.Features(item_features)),
        users=None if users is None else datasets.Dataset.from_pandas(
            users, preserve_index=False, features=datasets.Features({name: datasets.Value("string") for name in users.columns})),
        users_note=users_note,
    )


def bundled_movielens_folder() -> Path:
    """MovieLens-100k ships inside the RecBole wheel; find it without importing recbole (its deps may be absent)."""
    spec = importlib.util.find_spec("recbole")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "dataset_example" / BUNDLED_DATASET_NAME if locations else None
    if folder is None or not (folder / f"{BUNDLED_DATASET_NAME}.inter").is_file():
        raise DataError(
            "data.path is not set and the MovieLens-100k copy bundled with RecBole was not found. "
            "Install it with `pip install --no-deps recbole==1.2.1`, or download ml-100k from "
            "https://grouplens.org/datasets/movielens/100k/ and set data.path to the unzipped folder "
            "(data.format: movielens)."
        )
    return folder


def _fixed_columns(config: DataConfig) -> ColumnNames:
    """Column names of layouts whose names are known (bundled data, MovieLens); only on/off comes from config."""
    return ColumnNames(timestamp="timestamp" if config.timestamp_column else None,
                       rating="rating" if config.rating_column else None)


def _config_columns(config: DataConfig) -> ColumnNames:
    return ColumnNames(config.user_column, config.item_column, config.timestamp_column, config.rating_column)


def _format_from_extension(path: Path) -> str:
    file_format = _EXTENSION_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise DataError(
            f"Cannot tell the format of {path} from its extension; set data.format to one of "
            f"{', '.join(_TABLE_FORMATS)} or rename it to {', '.join(sorted(_EXTENSION_FORMATS))}."
        )
    return file_format


def _recbole_dataset_name(folder: Path, configured: str) -> str:
    """For format auto: data.dataset_name when its .inter file exists, else the folder's only .inter file."""
    if (folder / f"{configured}.inter").is_file():
        return configured
    candidates = sorted(folder.glob("*.inter"))
    if len(candidates) == 1:
        logger.info("Using RecBole dataset %r found in %s (data.dataset_name is %r).", candidates[0].stem, folder, configured)
        return candidates[0].stem
    raise DataError(
        f"{folder} has no {configured}.inter; found {[path.name for path in candidates]}. "
        "Set data.dataset_name to the atomic-file prefix."
    )


def _detect_folder_format(folder: Path) -> str:
    if any(folder.glob("*.inter")):
        return "recbole"
    if (folder / "u.data").is_file() or (folder / "ratings.dat").is_file():
        return "movielens"
    found = sorted(path.name for path in folder.iterdir())[:20]
    raise DataError(
        f"Cannot guess the data format of folder {folder} (found {found}). Expected RecBole *.inter/*.item files, "
        "a MovieLens folder with u.data/u.item, or set data.format and data.interactions_file/data.items_file."
    )


def _resolve_table_file(name: Optional[str], base: Optional[Path], setting: str) -> Path:
    if name is None:
        raise DataError(f"data.{setting} is not set; csv/tsv/jsonl/parquet data needs both "
                        "data.interactions_file and data.items_file.")
    path = Path(name)
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.is_dir():
        raise DataError(f"data.{setting} {path} is a folder, not a file. Set data.{setting} to the file inside it.")
    if not path.is_file():
        raise DataError(f"data.{setting} {path} does not exist. Fix data.{setting} (relative paths resolve against data.path).")
    return path


def _read_raw_tables(config: DataConfig) -> RawTables:
    """Decide the layout (config.format or a guess) and hand over to the matching reader."""
    file_format = config.format
    if config.path is None and config.interactions_file is None:
        if file_format not in ("auto", "recbole", "movielens"):
            raise DataError(f"data.format is {file_format!r} but data.interactions_file is not set.")
        return read_recbole(bundled_movielens_folder(), BUNDLED_DATASET_NAME, _fixed_columns(config))
    base = Path(config.path).expanduser() if config.path is not None else None
    if base is not None and not base.exists():
        raise DataError(f"data.path {base} does not exist. Set data.path to the data folder "
                        "(or leave it unset for the bundled MovieLens-100k).")
    interactions_name = config.interactions_file
    if base is not None and base.is_file():  # data.path may name the interactions file itself
        if base.suffix == ".inter":
            return read_recbole(base.parent, base.stem, _config_columns(config), config.encoding)
        interactions_name, base = interactions_name or str(base), base.parent
    folder = base or Path(".")
    if file_format == "auto":
        file_format = _detect_folder_format(folder) if interactions_name is None else "by-extension"
        if file_format == "recbole":
            return read_recbole(folder, _recbole_dataset_name(folder, config.dataset_name), _config_columns(config),
                                config.encoding)
    if file_format == "recbole":
        return read_recbole(folder, config.dataset_name, _config_columns(config), config.encoding)
    if file_format == "movielens":
        return read_movielens(folder)
    inter_path = _resolve_table_file(interactions_name, base, "interactions_file")
    item_path = _resolve_table_file(config.items_file, base, "items_file")
    tables = []
    for path in (inter_path, item_path):
        table_format = _format_from_extension(path) if file_format == "by-extension" else file_format
        separator = config.field_delimiter(table_format) if config.delimiter is not None else None
        tables.append(read_table(path, table_format, separator, config.encoding))
    return RawTables(tables[0], tables[1], _config_columns(config), str(inter_path), str(item_path))


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


def _check_columns(frame: pd.DataFrame, wanted: dict[str, str], source: str) -> None:
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


def _parse_numbers(values: pd.Series, column: str, source: str, fix: str) -> np.ndarray:
    """Numeric column -> float64, naming the first bad row instead of pandas' generic error."""
    if pd.api.types.is_datetime64_any_dtype(values):  # parquet datetimes -> Unix seconds
        numbers = (values - pd.Timestamp(0, tz=values.dt.tz)) / pd.Timedelta(seconds=1)
    elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values
    else:
        stripped = values.map(lambda value: value.strip() if isinstance(value, str) else value)
        numbers = pd.to_numeric(stripped, errors="coerce")
    bad = np.flatnonzero(pd.isna(numbers).to_numpy())
    if len(bad):
        raise DataError(f"{source}: column {column!r} has a non-numeric value {_shown(values, bad)} "
                        f"(first of {len(bad)} bad row(s), counting data rows from 1). {fix}")
    return numbers.to_numpy(dtype=np.float64)


def _shown(values: pd.Series, bad_rows: np.ndarray) -> str:
    row = int(bad_rows[0])
    value = values.iloc[row]
    return f"{'(empty)' if value_to_text(value).strip() == '' else repr(value)} at row {row + 1}"


def _parse_timestamps(values: pd.Series, column: str, source: str) -> np.ndarray:
    """Numbers (any unit) as they are; a column of ISO 8601 date/time strings -> Unix seconds (naive = UTC)."""
    fix = ("Timestamps must be numbers such as Unix seconds or ISO 8601 dates/times such as 2020-01-31T12:00:00; "
           "fix the file, point data.timestamp_column at another column, or set data.timestamp_column: null to "
           "use file order.")
    if pd.api.types.is_datetime64_any_dtype(values) or pd.api.types.is_numeric_dtype(values):
        return _parse_numbers(values, column, source, fix)
    stripped = values.map(lambda value: value.strip() if isinstance(value, str) else value)
    numbers = pd.to_numeric(stripped, errors="coerce")
    not_numbers = pd.isna(numbers).to_numpy()
    if not not_numbers.any():
        return numbers.to_numpy(dtype=np.float64)
    texts = stripped.map(lambda value: value if isinstance(value, str) else "")
    dates = pd.to_datetime(texts, format="ISO8601", utc=True, errors="coerce")
    not_dates = pd.isna(dates).to_numpy()
    if not not_dates.any():
        logger.info("%s: column %r holds ISO 8601 dates/times; converted to Unix seconds (naive times read as UTC).",
                    source, column)
        return ((dates - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
    looks_like_dates = not_dates.sum() < not_numbers.sum()  # report against the form most rows use
    bad = np.flatnonzero(not_dates if looks_like_dates else not_numbers)
    kind = "an ISO 8601 date/time like the other rows" if looks_like_dates else "a number"
    raise DataError(f"{source}: column {column!r} has {_shown(values, bad)}, which is not {kind} "
                    f"(first of {len(bad)} bad row(s), counting data rows from 1). {fix}")


def _parse_ids(values: pd.Series, column: str, source: str) -> pd.Series:
    ids = values.map(value_to_text).str.strip()
    empty = np.flatnonzero((ids == "").to_numpy())
    if len(empty):
        raise DataError(f"{source}: column {column!r} is empty at row {int(empty[0]) + 1} "
                        f"({len(empty)} row(s) without an id); every row needs an id.")
    return ids.astype(str)


def _canonical_interactions(raw: RawTables) -> pd.DataFrame:
    frame, columns, source = raw.interactions, raw.columns, raw.interactions_source
    if len(frame) == 0:
        raise DataError(f"{source} has no interactions (only a header?); add data rows.")
    wanted = {"user_column": columns.user, "item_column": columns.item}
    if columns.timestamp is not None:
        wanted["timestamp_column"] = columns.timestamp
    _check_columns(frame, wanted, source)
    canonical = pd.DataFrame({
        "user_id": _parse_ids(frame[columns.user], columns.user, source),
        "item_id": _parse_ids(frame[columns.item], columns.item, source),
    })
    if columns.timestamp is None:
        canonical["timestamp"] = np.arange(len(frame), dtype=np.float64)  # file order is the only clock
    else:
        canonical["timestamp"] = _parse_timestamps(frame[columns.timestamp], columns.timestamp, source)
    if columns.rating is not None and columns.rating in frame.columns:
        canonical["rating"] = _parse_numbers(frame[columns.rating], columns.rating, source,
                                             "Ratings must be numbers; fix the file or set data.rating_column: null.")
    elif columns.rating is not None:
        logger.info("%s has no rating column %r; treating every interaction as implicit feedback.", source, columns.rating)
    return canonical


def _canonical_items(raw: RawTables, template: str, max_text_chars: Optional[int] = None) -> pd.DataFrame:
    frame, source, id_column = raw.items, raw.items_source, raw.columns.item
    if len(frame) == 0:
        raise DataError(f"{source} has no items (only a header?); add one row per item.")
    _check_columns(frame, {"item_column": id_column}, source)
    items = pd.DataFrame({"item_id": _parse_ids(frame[id_column], id_column, source)})
    for name in frame.columns:
        if name not in (id_column, "item_id", "text"):
            items[str(name)] = frame[name].map(value_to_text).astype(str)
    if "text" in frame.columns:
        logger.warning("%s has a 'text' column; it is replaced by the rendered item text.", source)
    duplicated = items["item_id"].duplicated()
    if duplicated.any():
        logger.warning("%s lists %d item id(s) more than once; keeping the first row of each.", source, int(duplicated.sum()))
        items = items[~duplicated].reset_index(drop=True)
    items.insert(1, "text", render_item_texts(items, template, source, max_text_chars))
    return items


def _load_users(config: DataConfig, raw: RawTables) -> tuple[Optional[pd.DataFrame], Optional[str]]:
    """Canonical users (user_id, profile, attributes) and, when there are none, why."""
    if config.users_file is not None:
        path = _resolve_table_file(config.users_file, _data_folder(config), "users_file")
        users = _canonical_users(_read_users_file(path, config), config.user_column, config.user_profile_template, str(path))
        logger.info("Read %d user profiles from %s (e.g. %r).", len(users), path, users["profile"].iloc[0])
        return users, None
    if raw.users_file is None:
        return None, (f"no users file was found next to {raw.interactions_source} and data.users_file is not set")
    try:
        users = _canonical_users(_read_users_file(raw.users_file, config), raw.columns.user,
                                 config.user_profile_template, str(raw.users_file))
    except DataError as error:
        logger.warning("Not using the users file %s found next to the data: %s", raw.users_file, error)
        return None, f"the users file {raw.users_file} found next to the data could not be used: {error}"
    logger.info("Read %d user profiles from %s (e.g. %r).", len(users), raw.users_file, users["profile"].iloc[0])
    return users, None


def _data_folder(config: DataConfig) -> Optional[Path]:
    """What relative file settings resolve against: data.path, or its folder when it names a file."""
    if config.path is None:
        return None
    base = Path(config.path).expanduser()
    return base.parent if base.is_file() else base


def _read_users_file(path: Path, config: DataConfig) -> pd.DataFrame:
    """u.user as MovieLens' (pipe-separated, no header), other *.user files as RecBole's, the rest as tables."""
    if path.name == "u.user":
        return read_movielens_users(path)
    if path.suffix == ".user":
        return read_recbole_users(path, config.encoding)
    table_format = config.format if config.format in _TABLE_FORMATS else _format_from_extension(path)
    separator = config.field_delimiter(table_format) if config.delimiter is not None else None
    return read_table(path, table_format, separator, config.encoding)


def _canonical_users(frame: pd.DataFrame, id_column: str, template: str, source: str) -> pd.DataFrame:
    if len(frame) == 0:
        raise DataError(f"{source} has no users (only a header?); add one row per user, or unset data.users_file.")
    _check_columns(frame, {"user_column": id_column}, source)
    users = pd.DataFrame({"user_id": _parse_ids(frame[id_column], id_column, source)})
    duplicated = users["user_id"].duplicated(keep=False)
    if duplicated.any():
        examples = users.loc[duplicated, "user_id"].unique()[:5].tolist()
        raise DataError(f"{source} lists user id(s) {examples} more than once ({int(duplicated.sum())} rows); a user's "
                        "profile must come from one row. Remove or merge the duplicate rows.")
    for name in frame.columns:
        if name not in (id_column, "user_id", "profile"):
            users[str(name)] = frame[name].map(value_to_text).astype(str)
    profiles = render_user_profiles(users, template, source)
    users.insert(1, "profile", [profile or "" for profile in profiles])
    return users


def _apply_rating_threshold(interactions: pd.DataFrame, threshold: Optional[float], source: str) -> pd.DataFrame:
    """Explicit ratings -> implicit positives: keep rating >= threshold."""
    if threshold is None:
        return interactions
    if "rating" not in interactions.columns:
        raise DataError(f"data.rating_threshold is {threshold} but {source} has no rating column "
                        "(data.rating_column); unset data.rating_threshold or point data.rating_column at the ratings.")
    kept = interactions[interactions["rating"] >= threshold].reset_index(drop=True)
    if len(kept) == 0:
        raise DataError(f"data.rating_threshold {threshold} removes every interaction in {source}; lower it.")
    logger.info("rating_threshold %s kept %d of %d interactions.", threshold, len(kept), len(interactions))
    return kept


def _drop_unknown_items(interactions: pd.DataFrame, items: pd.DataFrame, raw: RawTables) -> pd.DataFrame:
    """Items without metadata cannot be encoded as text, so their interactions are dropped."""
    known = interactions["item_id"].isin(set(items["item_id"]))
    unknown = int((~known).sum())
    if unknown == 0:
        return interactions
    examples = interactions.loc[~known, "item_id"].unique()[:5].tolist()
    if unknown == len(interactions):
        raise DataError(f"None of the item ids in {raw.interactions_source} (e.g. {examples}) appear in "
                        f"{raw.items_source}; check that both files use the same ids (data.item_column).")
    logger.warning("Dropping %d interaction(s) in %s whose item has no row in %s (e.g. %s).",
                   unknown, raw.interactions_source, raw.items_source, examples)
    return interactions[known].reset_index(drop=True)


def _drop_duplicate_interactions(interactions: pd.DataFrame, source: str) -> pd.DataFrame:
    """The same user, item and time twice is a logging artefact; kept, it would put a leave-one-out
    target into its own history (where exclude_history hides it from the ranking)."""
    duplicated = interactions.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first")
    count = int(duplicated.sum())
    if count == 0:
        return interactions
    example = interactions.loc[duplicated, ["user_id", "item_id", "timestamp"]].iloc[0].tolist()
    logger.warning("Dropping %d duplicate interaction row(s) in %s (same user, item and timestamp as an earlier row, "
                   "e.g. user %r, item %r, timestamp %s); the first of each is kept.", count, source, *example)
    return interactions[~duplicated].reset_index(drop=True)
