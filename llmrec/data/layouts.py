"""Decide which layout a DataConfig points at (given or guessed) and hand over to the matching reader.

Relative paths in ``data.path`` resolve against the current working directory (so the shipped configs,
which say ``../shared/data/<set>``, are meant to be run from the repository root); relative
``data.interactions_file`` / ``items_file`` / ``users_file`` resolve against ``data.path``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

import pandas as pd

from ..config import DataConfig
from ..errors import DataError
from .readers import ColumnNames, RawTables, read_movielens, read_recbole, read_table
from .sequences import SEQUENCES_FILE_NAME, default_items_file, looks_like_sequence_file, read_sequences

logger = logging.getLogger(__name__)

BUNDLED_DATASET_NAME = "ml-100k"
TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
_EXTENSION_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
}


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


def format_from_extension(path: Path) -> str:
    """csv/tsv/jsonl/parquet from a file's extension (.txt reads as tsv), or a DataError saying what to set."""
    file_format = _EXTENSION_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise DataError(
            f"Cannot tell the format of {path} from its extension; set data.format to one of "
            f"{', '.join(TABLE_FORMATS)} or rename it to {', '.join(sorted(_EXTENSION_FORMATS))}."
        )
    return file_format


def resolve_table_file(name: Optional[str], base: Optional[Path], setting: str) -> Path:
    """`data.<setting>` as an existing file path (relative to data.path), or a DataError naming the setting."""
    if name is None:
        raise DataError(f"data.{setting} is not set; csv/tsv/jsonl/parquet data needs both "
                        "data.interactions_file and data.items_file.")
    path = Path(name).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.is_dir():
        raise DataError(f"data.{setting} {path} is a folder, not a file. Set data.{setting} to the file inside it.")
    if not path.is_file():
        raise DataError(f"data.{setting} {path} does not exist. Fix data.{setting} (relative paths resolve against data.path).")
    return path


def data_folder(config: DataConfig) -> Optional[Path]:
    """What relative file settings resolve against: data.path, or its folder when it names a file."""
    if config.path is None:
        return None
    base = Path(config.path).expanduser()
    return base.parent if base.is_file() else base


def read_raw_tables(config: DataConfig) -> RawTables:
    """Decide the layout (config.format or a guess) and hand over to the matching reader."""
    file_format = config.format
    if config.path is None and config.interactions_file is None:
        if file_format not in ("auto", "recbole", "movielens"):
            raise DataError(f"data.format is {file_format!r} but neither data.path nor data.interactions_file is set.")
        return read_recbole(bundled_movielens_folder(), BUNDLED_DATASET_NAME, _fixed_columns(config))
    base = Path(config.path).expanduser() if config.path is not None else None
    if base is not None and not base.exists():
        where = "" if base.is_absolute() else f" (relative paths resolve against the current directory, {Path.cwd()})"
        raise DataError(f"data.path {base} does not exist{where}. Set data.path to the data folder "
                        "(or leave it unset for the bundled MovieLens-100k).")
    interactions_name = config.interactions_file
    if base is not None and base.is_file():  # data.path may name the interactions file itself
        if base.suffix == ".inter":
            return read_recbole(base.parent, base.stem, _config_columns(config), config.encoding)
        # absolute: a relative data.path must not be resolved against its own folder a second time
        interactions_name, base = interactions_name or str(base.absolute()), base.parent
    folder = base or Path(".")
    if file_format == "auto":
        file_format = _guess_format(folder, interactions_name)
        if file_format == "recbole":
            return read_recbole(folder, _recbole_dataset_name(folder, config.dataset_name), _config_columns(config),
                                config.encoding)
    if file_format == "recbole":
        return read_recbole(folder, config.dataset_name, _config_columns(config), config.encoding)
    if file_format == "movielens":
        return read_movielens(folder)
    if file_format == "sequences":
        return _read_sequence_layout(config, folder, base, interactions_name)
    inter_path = resolve_table_file(interactions_name, base, "interactions_file")
    item_path = resolve_table_file(config.items_file, base, "items_file")
    tables = [_read_config_table(path, config, file_format) for path in (inter_path, item_path)]
    return RawTables(tables[0], tables[1], _config_columns(config), str(inter_path), str(item_path))


def _read_config_table(path: Path, config: DataConfig, file_format: str) -> pd.DataFrame:
    """A csv/tsv/jsonl/parquet file with the config's delimiter and encoding; `by-extension`/`sequences` guess it."""
    table_format = file_format if file_format in TABLE_FORMATS else format_from_extension(path)
    separator = config.field_delimiter(table_format) if config.delimiter is not None else None
    return read_table(path, table_format, separator, config.encoding)


def _read_sequence_layout(config: DataConfig, folder: Path, base: Optional[Path],
                          interactions_name: Optional[str]) -> RawTables:
    """data.path (a folder with sequences.txt, or the file) plus data.items_file or the items.* beside it."""
    if interactions_name is not None:
        sequence_path = resolve_table_file(interactions_name, base, "interactions_file")
    elif (folder / SEQUENCES_FILE_NAME).is_file():
        sequence_path = folder / SEQUENCES_FILE_NAME
    else:
        raise DataError(f"data.format is sequences but {folder} has no {SEQUENCES_FILE_NAME}; point data.path at the "
                        "sequence file itself, or set data.interactions_file to its name.")
    if config.items_file is not None:
        items_path: Optional[Path] = resolve_table_file(config.items_file, base, "items_file")
    else:
        items_path = default_items_file(sequence_path.parent)
    items = None if items_path is None else _read_config_table(items_path, config, "by-extension")
    return read_sequences(sequence_path, items_path, items, config.encoding, config.user_column, config.item_column)


def _guess_format(folder: Path, interactions_name: Optional[str]) -> str:
    """The layout of a folder, or 'sequences' / 'by-extension' for a named interactions file."""
    if interactions_name is None:
        return _detect_folder_format(folder)
    path = Path(interactions_name).expanduser()
    path = path if path.is_absolute() else folder / path
    return "sequences" if path.is_file() and looks_like_sequence_file(path) else "by-extension"


def _fixed_columns(config: DataConfig) -> ColumnNames:
    """Column names of layouts whose names are known (bundled data, MovieLens); only on/off comes from config."""
    return ColumnNames(timestamp="timestamp" if config.timestamp_column else None,
                       rating="rating" if config.rating_column else None)


def _config_columns(config: DataConfig) -> ColumnNames:
    return ColumnNames(config.user_column, config.item_column, config.timestamp_column, config.rating_column)


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
    if (folder / SEQUENCES_FILE_NAME).is_file():
        return "sequences"
    found = sorted(path.name for path in folder.iterdir())[:20]
    raise DataError(
        f"Cannot guess the data format of folder {folder} (found {found}). Expected RecBole *.inter/*.item files, "
        f"a MovieLens folder with u.data/u.item, a {SEQUENCES_FILE_NAME} sequence file, or set data.format and "
        "data.interactions_file/data.items_file."
    )
