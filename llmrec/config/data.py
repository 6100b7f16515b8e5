"""`data:` — what to read and how to split it."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from .checks import check_choice
from .fields import setting


@dataclass
class DataConfig:
    format: str = setting(
        "auto", "recbole | movielens | csv | tsv | jsonl | parquet | sequences (one line per user: user id, "
                "then item ids oldest first, as SASRec/BERT4Rec publish) | auto (guess from path).",
    )
    path: Optional[str] = setting(
        None, "Data folder or file (relative paths resolve against the current directory). "
              "None = MovieLens-100k shipped in the RecBole wheel.",
    )
    dataset_name: str = setting("ml-100k", "RecBole atomic-file prefix.")
    interactions_file: Optional[str] = setting(
        None, "Interactions file for csv/tsv/jsonl/parquet data, or the sequence file "
              "(default sequences.txt in data.path).",
    )
    items_file: Optional[str] = setting(
        None, "Item metadata file (csv/tsv/jsonl/parquet). Sequence data: optional, default "
              "items.tsv/.csv/.jsonl/.parquet beside the sequence file; without one, texts are the ids.",
    )
    user_column: str = setting("user_id", "Column of the user id (csv/tsv/jsonl/parquet).")
    item_column: str = setting("item_id", "Column of the item id, in interactions and items files.")
    timestamp_column: Optional[str] = setting(
        "timestamp", "Column ordering each user's interactions; null = file order (positions stand in for time).",
    )
    rating_column: Optional[str] = setting(
        "rating", "Column of explicit ratings, read by data.rating_threshold; null = none.",
    )
    item_text_template: str = setting(
        "{movie_title} ({release_year}). Genres: {class}",
        "Python format string over item-file columns that renders each item's text.",
    )
    unescape_html: bool = setting(
        True, "Turn HTML character references in item texts (&amp; &quot; &#9733;, as in "
              "scraped Amazon titles) into the characters they stand for; only complete "
              "references ending in ';' change.",
    )
    item_value_separator: Optional[str] = setting(
        None, "Separator inside multi-valued item fields, e.g. '|' in ML-1M's Action|Adventure, written "
              "as ', ' in item texts; None = values as they are.",
    )
    users_file: Optional[str] = setting(
        None, "User attributes (csv/tsv/jsonl/parquet; a *.user file is read as RecBole's, u.user as "
              "MovieLens') rendered into profile texts, one row per user keyed by user_column. None = the "
              "data set's own file if it has one (RecBole {dataset_name}.user, MovieLens u.user).",
    )
    user_profile_template: str = setting(
        "{age}-year-old {gender} {occupation}",
        "Python format string over users-file columns that renders each user's profile text; "
        "M/F in a 'gender' or 'sex' column read 'male'/'female'.",
    )
    rating_threshold: Optional[float] = setting(
        None, "Keep only interactions rated >= this; None = every interaction is implicit feedback.",
    )
    split: str = setting(
        "leave_one_out", "leave_one_out | temporal | cold_items (held-out items, see cold_item_*) | "
                         "cold_users (held-out users, see cold_user_*).",
    )
    seed: int = setting(
        42, "Seed of the random cold_items / cold_users choice; apart from training.seed so that "
            "training seeds can vary over one fixed split.",
    )
    cold_item_fraction: float = setting(0.15, "cold_items split: share of the interacted items held out of training.")
    cold_item_selection: str = setting("random", "cold_items split: random (seeded) | newest (by first interaction).")
    cold_user_fraction: float = setting(0.1, "cold_users split: share of the users held out of training.")
    cold_user_history_length: int = setting(
        3, "cold_users split: items a cold user's history shows (0 = profile only).",
    )
    temporal_valid_fraction: float = setting(
        0.1, "temporal split: share of interactions (by time) in the valid window.",
    )
    temporal_test_fraction: float = setting(0.1, "temporal split: share of interactions (by time) in the test window.")
    delimiter: Optional[str] = setting(
        None, "Field separator of csv/tsv/txt files, e.g. ';' or '|' ('\\t' or 'tab' = tab); "
              "None = ',' for csv, tab for tsv. RecBole and MovieLens files keep their own.",
    )
    encoding: str = setting(
        "utf-8", "Text encoding of csv/tsv/jsonl and RecBole files, e.g. latin-1 or cp1252. "
                 "MovieLens folders are read as UTF-8 with a latin-1 fallback (the official files are latin-1).",
    )
    max_item_text_chars: int = setting(
        2000, "Rendered item texts longer than this are cut (with a warning); the tokenizer keeps only "
              "model.max_text_length tokens anyway, and this bounds memory for huge descriptions.",
    )

    def validate(self) -> None:
        check_choice("data.format", self.format,
                      ["auto", "recbole", "movielens", "csv", "tsv", "jsonl", "parquet", "sequences"])
        check_choice("data.split", self.split, ["leave_one_out", "temporal", "cold_items", "cold_users"])
        check_choice("data.cold_item_selection", self.cold_item_selection, ["random", "newest"])
        for name in ("cold_item_fraction", "cold_user_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"data.{name} must be in (0, 1), got {getattr(self, name)}.")
        if self.cold_user_history_length < 0:
            raise ConfigError(f"data.cold_user_history_length must be >= 0, got {self.cold_user_history_length}.")
        for name in ("temporal_valid_fraction", "temporal_test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise ConfigError(f"data.{name} must be in (0, 0.5), got {value}.")
        if self.delimiter is not None:
            separator = self.field_delimiter("csv")
            if separator == "" or any(char in separator for char in "\r\n\"'"):
                raise ConfigError(f"data.delimiter must be a non-empty separator without quotes or line breaks, "
                                  f"got {self.delimiter!r}; e.g. ';', '|' or 'tab'.")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"data.encoding {self.encoding!r} is not a known text encoding; "
                              "use e.g. utf-8, latin-1 or cp1252.") from None
        if self.item_value_separator is not None and not self.item_value_separator.strip():
            raise ConfigError(f"data.item_value_separator must be a visible separator such as '|', got "
                              f"{self.item_value_separator!r}; set it to null to keep values as they are.")
        if self.max_item_text_chars <= 0:
            raise ConfigError(f"data.max_item_text_chars must be positive, got {self.max_item_text_chars}.")
        columns = {"user_column": self.user_column, "item_column": self.item_column,
                   "timestamp_column": self.timestamp_column, "rating_column": self.rating_column}
        named = [(setting, name) for setting, name in columns.items() if name is not None]
        for position, (setting, name) in enumerate(named):
            for other_setting, other_name in named[position + 1:]:
                if name == other_name:
                    raise ConfigError(f"data.{setting} and data.{other_setting} both name column {name!r}; "
                                      "each field needs its own column (set the optional ones to null if absent).")

    def field_delimiter(self, file_format: str) -> str:
        """The separator for a csv/tsv file: data.delimiter (with 'tab' and a typed '\\t' meaning tab) or the format's own."""
        if self.delimiter is None:
            return "\t" if file_format == "tsv" else ","
        if self.delimiter.lower() in ("tab", "\\t"):
            return "\t"
        return self.delimiter

