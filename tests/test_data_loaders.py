"""Every supported layout must load to the same canonical tables, and bad input must say what is wrong."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pandas as pd
import pytest

from llmrec.config import DataConfig
from llmrec.data import InteractionData, load_interaction_data
from llmrec.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
TABULAR = FIXTURES / "tabular"

EXPECTED_INTERACTIONS = {
    "user_id": ["1", "1", "2", "1", "2", "3", "3"],
    "item_id": ["1", "2", "3", "3", "1", "2", "1"],
    "timestamp": [100.0, 100.0, 50.0, 90.0, 60.0, 70.0, 80.0],
    "rating": [5.0, 3.0, 4.0, 2.0, 1.0, 4.0, 5.0],
}
EXPECTED_ITEM_IDS = ["1", "2", "3", "4"]
EXPECTED_TEXTS = [
    "Toy Story (1995). Genres: Animation Children's Comedy",
    "Café au Lait (1993). Genres: Comedy",
    "Heat (1995). Genres: Action Crime Thriller",
    "Nosferatu (1922). Genres: Horror",
]


def _tabular_config(interactions: str, items: str, path: Path | None = TABULAR, **overrides) -> DataConfig:
    fmt = overrides.pop("format", "auto")
    return DataConfig(format=fmt, path=None if path is None else str(path), interactions_file=interactions,
                      items_file=items, **overrides)


def _jsonl_config(**overrides) -> DataConfig:
    return _tabular_config("inter.jsonl", "items.jsonl", format="jsonl", user_column="userId",
                           item_column="movieId", rating_column="stars", timestamp_column="ts", **overrides)


def _assert_canonical(data: InteractionData) -> None:
    assert data.interactions.column_names == ["user_id", "item_id", "timestamp", "rating"]
    assert data.interactions.to_dict() == EXPECTED_INTERACTIONS
    assert data.interactions.features["user_id"].dtype == "string"
    assert data.interactions.features["timestamp"].dtype == "float64"
    assert data.items["item_id"] == EXPECTED_ITEM_IDS
    assert data.items["text"] == EXPECTED_TEXTS


@pytest.mark.parametrize(
    "config",
    [
        DataConfig(format="recbole", path=str(FIXTURES / "recbole"), dataset_name="tiny"),
        DataConfig(format="auto", path=str(FIXTURES / "recbole"), dataset_name="tiny"),
        DataConfig(format="auto", path=str(FIXTURES / "recbole")),  # only one *.inter -> its prefix is used
        DataConfig(format="movielens", path=str(FIXTURES / "movielens")),
        DataConfig(format="auto", path=str(FIXTURES / "movielens")),
        _tabular_config("inter.csv", "items.csv", format="csv"),
        _tabular_config("inter.csv", "items.csv"),
        _tabular_config("inter.tsv", "items.tsv", format="tsv"),
        _tabular_config("inter.tsv", "items.tsv"),
        _jsonl_config(),
    ],
    ids=["recbole", "recbole-auto", "recbole-auto-prefix", "movielens", "movielens-auto", "csv", "csv-auto",
         "tsv", "tsv-auto", "jsonl"],
)
def test_every_format_loads_the_same_canonical_data(config: DataConfig) -> None:
    _assert_canonical(load_interaction_data(config))


def test_parquet_loads_the_same_canonical_data(tmp_path: Path) -> None:
    interactions = pd.read_csv(TABULAR / "inter.csv")  # integer ids and ratings, as parquet files usually have
    items = pd.read_csv(TABULAR / "items.csv")
    interactions.to_parquet(tmp_path / "inter.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    _assert_canonical(load_interaction_data(_tabular_config("inter.parquet", "items.parquet", path=tmp_path)))
    _assert_canonical(load_interaction_data(
        _tabular_config(str(tmp_path / "inter.parquet"), str(tmp_path / "items.parquet"), path=None, format="parquet")))


def test_movielens_folder_and_recbole_files_render_identical_text() -> None:
    movielens = load_interaction_data(DataConfig(format="movielens", path=str(FIXTURES / "movielens")))
    recbole = load_interaction_data(DataConfig(format="recbole", path=str(FIXTURES / "recbole"), dataset_name="tiny"))
    assert movielens.items.to_dict() == recbole.items.to_dict()
    cafe = movielens.items[1]
    assert cafe["movie_title"] == "Café au Lait"  # latin-1 decoded
    assert cafe["release_year"] == "1993"
    assert movielens.items[3]["release_year"] == "1922"  # no year in the title -> taken from the release date
    assert movielens.items[0]["class"] == "Animation Children's Comedy"


def test_movielens_1m_layout(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n2::20::3::978302109\n", encoding="latin-1")
    (tmp_path / "movies.dat").write_text(
        "10::Café (2000)::Comedy|Drama\n20::Jumanji (1995)::Adventure|Children's|Fantasy\n", encoding="latin-1")
    data = load_interaction_data(DataConfig(path=str(tmp_path)))
    assert data.interactions["item_id"] == ["10", "20"]
    assert data.interactions["timestamp"] == [978300760.0, 978302109.0]
    assert data.items["text"] == ["Café (2000). Genres: Comedy Drama",
                                  "Jumanji (1995). Genres: Adventure Children's Fantasy"]


def test_default_config_loads_bundled_movielens_100k() -> None:
    data = load_interaction_data(DataConfig())
    assert data.interactions.num_rows == 100000
    assert len(set(data.interactions["user_id"])) == 943
    assert data.items.num_rows == 1682
    assert data.items[0]["item_id"] == "1"
    assert data.items[0]["text"] == "Toy Story (1995). Genres: Animation Children's Comedy"
    assert data.interactions[0] == {"user_id": "196", "item_id": "242", "timestamp": 881250949.0, "rating": 3.0}


def test_missing_recbole_explains_how_to_get_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "recbole" else real_find_spec(name, *args))
    with pytest.raises(DataError) as error:
        load_interaction_data(DataConfig())
    assert "pip install --no-deps recbole==1.2.1" in str(error.value)
    assert "https://grouplens.org/datasets/movielens/100k/" in str(error.value)


def test_rating_threshold_keeps_only_high_ratings() -> None:
    data = load_interaction_data(_tabular_config("inter.csv", "items.csv", rating_threshold=4.0))
    assert data.interactions["rating"] == [5.0, 4.0, 4.0, 5.0]
    assert data.interactions["item_id"] == ["1", "3", "2", "1"]
    assert data.items.num_rows == 4  # the catalogue is not filtered


def test_rating_threshold_without_rating_column_fails(tmp_path: Path) -> None:
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n1,1,5\n", encoding="utf-8")
    (tmp_path / "items.csv").write_text("item_id,title\n1,A\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rating column"):
        load_interaction_data(_tabular_config("inter.csv", "items.csv", path=tmp_path, item_text_template="{title}",
                                              rating_threshold=3.0))


def test_no_timestamp_column_uses_file_order(tmp_path: Path) -> None:
    (tmp_path / "inter.csv").write_text("user,item\na,x\nb,y\na,y\n", encoding="utf-8")
    (tmp_path / "items.csv").write_text("item,title\nx,X\ny,Y\n", encoding="utf-8")
    data = load_interaction_data(_tabular_config("inter.csv", "items.csv", path=tmp_path, user_column="user",
                                                 item_column="item", timestamp_column=None, item_text_template="{title}"))
    assert data.interactions.to_dict() == {"user_id": ["a", "b", "a"], "item_id": ["x", "y", "y"],
                                           "timestamp": [0.0, 1.0, 2.0]}
    assert data.items.column_names == ["item_id", "text", "title"]


def test_missing_values_render_empty_and_whitespace_collapses(tmp_path: Path) -> None:
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n1,007,5\n", encoding="utf-8")
    (tmp_path / "items.csv").write_text("item_id,title,year\n007,  Dr.   No ,\n008,X,\n", encoding="utf-8")
    data = load_interaction_data(_tabular_config("inter.csv", "items.csv", path=tmp_path,
                                                 item_text_template="{title} {year} !"))
    assert data.items["text"] == ["Dr. No !", "X !"]
    assert data.interactions["item_id"] == ["007"]  # ids stay strings, leading zeros kept


def test_exact_duplicates_are_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n1,1,5\n1,1,5\n1,1,6\n", encoding="utf-8")
    (tmp_path / "items.csv").write_text("item_id,title\n1,A\n2,B\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        data = load_interaction_data(_tabular_config("inter.csv", "items.csv", path=tmp_path, item_text_template="{title}"))
    assert data.interactions["timestamp"] == [5.0, 6.0]  # a repeat at another time is a real re-consumption
    assert "Dropping 1 duplicate interaction row(s)" in caplog.text


def test_unknown_items_are_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n1,1,5\n1,9,6\n2,8,7\n", encoding="utf-8")
    (tmp_path / "items.csv").write_text("item_id,title\n1,A\n2,B\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        data = load_interaction_data(_tabular_config("inter.csv", "items.csv", path=tmp_path, item_text_template="{title}"))
    assert data.interactions["item_id"] == ["1"]
    assert "Dropping 2 interaction(s)" in caplog.text


# --- bad input -------------------------------------------------------------------------------------------


def _write(tmp_path: Path, interactions: str | bytes, items: str | bytes = "item_id,title\n1,A\n2,B\n",
           suffix: str = "csv") -> DataConfig:
    for name, content in ((f"inter.{suffix}", interactions), (f"items.{suffix}", items)):
        target = tmp_path / name
        target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return _tabular_config(f"inter.{suffix}", f"items.{suffix}", path=tmp_path, item_text_template="{title}")


@pytest.mark.parametrize(
    "interactions, items, suffix, expected",
    [
        ("user,item_id,timestamp\n1,1,5\n", "item_id,title\n1,A\n", "csv", ["'user_id' (data.user_column)", "found columns ['user', 'item_id', 'timestamp']"]),
        ("user_id;item_id;timestamp\n1;1;5\n", "item_id,title\n1,A\n", "csv", ["is the delimiter ';'?", "inter.csv"]),
        ("user_id,item_id,timestamp\n1,1,5\n1,2,yesterday\n", "item_id,title\n1,A\n2,B\n", "csv", ["'yesterday'", "row 2", "timestamp", "inter.csv"]),
        ("user_id,item_id,timestamp\n1,9,5\n", "item_id,title\n1,A\n", "csv", ["None of the item ids", "items.csv"]),
        (b"user_id,item_id,timestamp\n1,1,5\n", b"item_id,title\n1,Caf\xe9\n", "csv", ["items.csv", "not valid utf-8", "data.encoding"]),
        (b"user_id\titem_id\ttimestamp\n1\t1\t5\n", b"item_id\ttitle\n1\tCaf\xe9\n", "tsv", ["items.tsv", "not valid utf-8"]),
        ("", "item_id,title\n1,A\n", "csv", ["inter.csv", "is empty"]),
        ("user_id,item_id,timestamp\n", "item_id,title\n1,A\n", "csv", ["inter.csv", "no interactions"]),
        ("user_id,item_id,timestamp\n1,1,5\n", "item_id,title\n", "csv", ["items.csv", "no items"]),
        ("user_id,item_id,timestamp\n1,1,5\n", "id,title\n1,A\n", "csv", ["items.csv", "'item_id' (data.item_column)", "found columns ['id', 'title']"]),
        ("user_id,item_id,timestamp\n,1,5\n", "item_id,title\n1,A\n", "csv", ["user_id", "row 1"]),
        ('{"user_id": 1, "item_id": 1, "timestamp": 5}\n{"user_id": 2,\n', '{"item_id": 1, "title": "A"}\n', "jsonl",
         ["inter.jsonl line 2", "not valid JSON"]),
        ('{"user_id": 1, "item_id": 1, "timestamp": "2020-01-01"}\n{"user_id": 1, "item_id": 1, "timestamp": 5}\n',
         '{"item_id": 1, "title": "A"}\n', "jsonl", ["'2020-01-01'", "row 1", "Unix seconds"]),
        ("user_id,item_id,timestamp,rating\n1,1,5,good\n", "item_id,title\n1,A\n", "csv", ["rating", "'good'"]),
    ],
    ids=["missing-column", "wrong-delimiter", "bad-timestamp", "all-items-unknown", "non-utf8-csv", "non-utf8-tsv",
         "empty-file", "header-only", "no-items", "items-id-column", "empty-id", "bad-json-line", "date-string-timestamp",
         "bad-rating"],
)
def test_bad_input_raises_data_error_naming_the_problem(tmp_path: Path, interactions, items, suffix, expected) -> None:
    config = _write(tmp_path, interactions, items, suffix)
    with pytest.raises(DataError) as error:
        load_interaction_data(config)
    for fragment in expected:
        assert fragment in str(error.value)


def test_template_field_that_is_not_a_column(tmp_path: Path) -> None:
    config = _write(tmp_path, "user_id,item_id,timestamp\n1,1,5\n")
    config.item_text_template = "{title} ({year})"
    with pytest.raises(DataError) as error:
        load_interaction_data(config)
    assert "['year']" in str(error.value)
    assert "available columns: ['item_id', 'title']" in str(error.value)


def test_missing_paths_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_interaction_data(DataConfig(path=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match=r"data.items_file .*items.csv does not exist"):
        load_interaction_data(DataConfig(format="csv", path=str(TABULAR), interactions_file="inter.csv",
                                         items_file=str(tmp_path / "items.csv")))
    with pytest.raises(DataError, match="items_file is not set"):
        load_interaction_data(DataConfig(format="csv", path=str(TABULAR), interactions_file="inter.csv"))
    with pytest.raises(DataError, match="Cannot guess the data format"):
        load_interaction_data(DataConfig(path=str(tmp_path)))
    with pytest.raises(DataError, match=r"nope.inter does not exist"):
        load_interaction_data(DataConfig(format="recbole", path=str(FIXTURES / "recbole"), dataset_name="nope"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet could not be read as Parquet"):
        load_interaction_data(DataConfig(path=str(tmp_path), interactions_file="broken.parquet",
                                         items_file="broken.parquet"))
    with pytest.raises(DataError, match="neither u.data"):
        load_interaction_data(DataConfig(format="movielens", path=str(tmp_path)))
