"""Sequence files (data.format: sequences): one line per user, the user id then that user's item ids oldest first."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from llmrec.config import DataConfig, load_config
from llmrec.data import build_split, load_interaction_data
from llmrec.errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent
SEQUENCES = Path(__file__).parent / "fixtures" / "sequences"
ITEMS_TSV = (SEQUENCES / "items.tsv").read_text(encoding="utf-8")
TEMPLATE = "{title}. Genres: {genres}"


def _shared_data() -> Path | None:
    """The benchmark sets beside the clone (CI: <repo>/../shared/data), else this machine's /work/shared/data."""
    for folder in (REPO_ROOT.parent / "shared" / "data", Path("/work/shared/data")):
        if (folder / "ml-1m" / "sequences.txt").is_file():
            return folder
    return None


def _config(path: Path | str, **overrides: Any) -> DataConfig:
    settings = {"format": "sequences", "path": str(path), "item_text_template": TEMPLATE, "item_value_separator": "|"}
    settings.update(overrides)
    return DataConfig(**settings)


def _write(folder: Path, sequences: str | bytes, items: str | None = ITEMS_TSV) -> Path:
    (folder / "sequences.txt").write_bytes(sequences if isinstance(sequences, bytes) else sequences.encode("utf-8"))
    if items is not None:
        (folder / "items.tsv").write_text(items, encoding="utf-8")
    return folder


@pytest.mark.parametrize("config", [
    _config(SEQUENCES),
    _config(SEQUENCES, format="auto"),  # a folder with sequences.txt
    _config(SEQUENCES / "sequences.txt", format="auto"),  # the file itself; items.tsv found beside it
    _config(SEQUENCES, interactions_file="sequences.txt", items_file="items.tsv"),
], ids=["folder", "auto-folder", "auto-file", "named-files"])
def test_sequence_file_loads_positions_as_timestamps(config: DataConfig) -> None:
    data = load_interaction_data(config)
    assert data.timestamps_are_positions
    assert data.interactions.to_dict() == {
        "user_id": ["u1"] * 4 + ["u2"] * 3 + ["u3"] * 5,
        "item_id": ["10", "20", "30", "40", "20", "30", "20", "40", "10", "30", "20", "50"],
        "timestamp": [0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0, 4.0],
    }
    assert data.items["item_id"] == ["10", "20", "30", "40", "50", "60"]  # never-watched 60 stays rankable
    assert data.items["text"][:4] == ["Toy Story (1995). Genres: Animation, Comedy", "Cats & Dogs (2001). Genres: Comedy",
                                      "Heat (1995). Genres: Action, Crime, Thriller",
                                      "AT&T Archives \u2605. Genres: Documentary"]
    assert data.items["genres"][0] == "Animation|Comedy"  # the metadata column itself is kept as written


def test_relative_data_path_resolves_against_the_current_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(SEQUENCES.parent.parent)  # tests/
    for path in ("fixtures/sequences", "fixtures/sequences/sequences.txt"):
        assert len(load_interaction_data(_config(path, format="auto")).interactions) == 12


def test_relative_data_path_naming_a_table_file_is_not_resolved_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: data.path 'fixtures/tabular/inter.csv' was looked up as fixtures/tabular/fixtures/tabular/inter.csv."""
    monkeypatch.chdir(SEQUENCES.parent.parent)
    data = load_interaction_data(DataConfig(path="fixtures/tabular/inter.csv", items_file="items.csv"))
    assert len(data.interactions) == 7


def test_html_references_are_kept_when_unescape_html_is_off() -> None:
    data = load_interaction_data(_config(SEQUENCES, unescape_html=False, item_value_separator=None))
    assert data.items["text"][1] == "Cats &amp; Dogs (2001). Genres: Comedy"
    assert data.items["text"][0] == "Toy Story (1995). Genres: Animation|Comedy"


def test_items_missing_from_the_items_file_are_dropped_with_a_warning(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, "u1 10 99 20 30\nu2 98 20\n")
    with caplog.at_level(logging.WARNING, logger="llmrec"):
        data = load_interaction_data(_config(tmp_path))
    assert data.interactions["item_id"] == ["10", "20", "30", "20"]
    assert data.interactions["timestamp"] == [0.0, 2.0, 3.0, 1.0]  # positions in the line, gaps where items went
    assert "Dropping 2 interaction(s)" in caplog.text and "items.tsv" in caplog.text and "'99'" in caplog.text


def test_without_an_items_file_the_ids_are_the_texts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, "a 3 1 2\nb 2 3\n", items=None)
    with caplog.at_level(logging.WARNING, logger="llmrec"):
        data = load_interaction_data(_config(tmp_path))
    assert data.items["item_id"] == ["3", "1", "2"] and data.items["text"] == ["3", "1", "2"]
    assert "No items file" in caplog.text and "data.items_file" in caplog.text


def test_items_file_in_jsonl_and_users_file(tmp_path: Path) -> None:
    _write(tmp_path, "u1 a b c\nu2 c b a\n", items=None)
    (tmp_path / "items.jsonl").write_text('{"item_id": "a", "title": "A"}\n{"item_id": "b", "title": "B"}\n'
                                          '{"item_id": "c", "title": "C"}\n', encoding="utf-8")
    (tmp_path / "users.csv").write_text("user_id,age,gender,occupation\nu1,24,M,artist\n", encoding="utf-8")
    data = load_interaction_data(_config(tmp_path, item_text_template="{title}", users_file="users.csv"))
    assert data.items["text"] == ["A", "B", "C"]
    assert data.user_profiles == {"u1": "24-year-old male artist"}


SEQUENCE_ERRORS = [
    ("line-without-items", "u1 10 20\nu2\n", ["sequences.txt line 2", "user 'u2' has no items"]),
    ("user-on-two-lines", "u1 10 20\n\nu2 30\nu1 40\n", ["sequences.txt line 4", "'u1' already has a line (line 1)"]),
    ("really-csv", "user_id,item_id\nu1,10\n", ["sequences.txt line 1", "looks like a CSV file", "data.format: csv"]),
    ("csv-without-header", "u1,10,20\n", ["sequences.txt line 1", "looks like a CSV file"]),
    ("header-line", "user_id items\nu1 10 20\n", ["sequences.txt line 1", "looks like a header"]),
    ("nul-byte", b"u1 10 20\nu2 1\x000\n", ["sequences.txt line 2", "NUL byte"]),
    ("empty-file", "\n \n", ["sequences.txt is empty", "one line per user"]),
    ("latin-1", b"u1 10 20\ncaf\xe9 30\n", ["sequences.txt is not valid utf-8", "(line 2)", "data.encoding"]),
    ("no-known-item", "u1 7 8\n", ["None of the item ids", "sequences.txt", "items.tsv"]),
]


@pytest.mark.parametrize("sequences, expected", [case[1:] for case in SEQUENCE_ERRORS],
                         ids=[case[0] for case in SEQUENCE_ERRORS])
def test_bad_sequence_file_raises_data_error_naming_file_and_line(tmp_path: Path, sequences, expected) -> None:
    _write(tmp_path, sequences)
    with pytest.raises(DataError) as raised:
        load_interaction_data(_config(tmp_path))
    for fragment in expected:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@pytest.mark.parametrize("items, expected", [
    ("item_id\ttitle\tgenres\n10\tA\tx\n20\t   \t \n30\tC\tz\n", ["items.tsv line 3", "item '20' has no text"]),
    ("item_id\ttitle\tgenres\n10\tA\tx\n10\tA again\tx\n30\t\t\n", ["items.tsv line 4", "item '30' has no text"]),
], ids=["whitespace-only", "after-a-duplicate-row"])
def test_item_without_text_in_the_items_file_is_an_error(tmp_path: Path, items: str, expected: list[str]) -> None:
    _write(tmp_path, "u1 10 20 30\n", items=items)
    with pytest.raises(DataError) as raised:
        load_interaction_data(_config(tmp_path))
    for fragment in expected:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


def test_folder_without_sequences_txt_is_named(tmp_path: Path) -> None:
    (tmp_path / "items.tsv").write_text(ITEMS_TSV, encoding="utf-8")
    with pytest.raises(DataError, match="has no sequences.txt"):
        load_interaction_data(_config(tmp_path))


def test_tab_separated_txt_table_still_reads_as_tsv(tmp_path: Path) -> None:
    (tmp_path / "inter.txt").write_text("user_id\titem_id\ttimestamp\nu1\t10\t5\nu1\t20\t6\n", encoding="utf-8")
    (tmp_path / "items.tsv").write_text(ITEMS_TSV, encoding="utf-8")
    data = load_interaction_data(DataConfig(path=str(tmp_path / "inter.txt"), items_file="items.tsv",
                                            rating_column=None, item_text_template="{title}"))
    assert data.interactions["timestamp"] == [5.0, 6.0] and not data.timestamps_are_positions


def test_leave_one_out_follows_the_line_order() -> None:
    config = _config(SEQUENCES)
    split = build_split(load_interaction_data(config), config)
    item = {item_id: index for index, item_id in enumerate(split.item_ids, start=1)}
    assert split.user_ids == ["u1", "u2", "u3"]
    assert split.test.targets == [item["40"], item["20"], item["50"]]
    assert split.test.histories[2] == [item["40"], item["10"], item["30"], item["20"]]
    assert split.valid.targets == [item["30"], item["30"], item["20"]]
    assert split.train_sequences[1] == [item["20"]]  # u2's repeat of item 20 is its test target, not dropped


def test_cold_splits_work_and_temporal_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    data = load_interaction_data(_config(SEQUENCES))
    with caplog.at_level(logging.WARNING, logger="llmrec"):
        cold_items = build_split(data, _config(SEQUENCES, split="cold_items", cold_item_fraction=0.2,
                                               cold_item_selection="newest"))
    # Item 50 appears only at position 4 (u3's last): the latest earliest-position, so it is the newest.
    assert [cold_items.item_ids[index - 1] for index in cold_items.cold_item_indices] == ["50"]
    assert "earliest position" in caplog.text
    cold_users = build_split(data, _config(SEQUENCES, split="cold_users", cold_user_fraction=0.3,
                                           cold_user_history_length=2))
    assert len(cold_users.cold_test) == 1
    with pytest.raises(DataError, match="temporal needs a clock shared by all users"):
        build_split(data, _config(SEQUENCES, split="temporal"))


@pytest.mark.parametrize("name, template, separator", [("ml-1m", TEMPLATE, "|"), ("amazon-beauty", "{title}", None)])
def test_head_of_the_real_benchmark_files_loads(tmp_path: Path, name: str, template: str, separator: str | None) -> None:
    shared = _shared_data()
    if shared is None:
        pytest.skip("benchmark data not found at <repo>/../shared/data or /work/shared/data")
    with (shared / name / "sequences.txt").open(encoding="utf-8") as handle:
        head = [next(handle) for _ in range(300)]
    (tmp_path / "sequences.txt").write_text("".join(head), encoding="utf-8")
    wanted = {item for line in head for item in line.split()[1:]}
    with (shared / name / "items.tsv").open(encoding="utf-8") as handle:
        header = next(handle)
        rows = [row for row in handle if row.split("\t", 1)[0] in wanted]
    (tmp_path / "items.tsv").write_text(header + "".join(rows), encoding="utf-8")
    data = load_interaction_data(DataConfig(format="auto", path=str(tmp_path), item_text_template=template,
                                            item_value_separator=separator))
    assert len(data.interactions) == sum(len(line.split()) - 1 for line in head)
    assert len(set(data.interactions["user_id"])) == 300 and len(data.items) == len(wanted) == len(rows)
    assert data.interactions["item_id"][:3] == head[0].split()[1:4]
    texts = data.items["text"]
    assert all(text.strip() for text in texts) and not any("&amp;" in text or "&quot;" in text for text in texts)
    if separator:
        assert not any("|" in text for text in texts) and ", " in texts[0]


@pytest.mark.parametrize("name, folder", [("ml1m", "ml-1m"), ("amazon_beauty", "amazon-beauty")])
def test_benchmark_configs_point_at_shared_data_from_the_repo_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   name: str, folder: str) -> None:
    config = load_config(REPO_ROOT / "configs" / f"{name}.yaml")
    config.data.validate()
    assert config.data.format == "sequences" and config.data.path == f"../shared/data/{folder}"
    header = (REPO_ROOT / "configs" / f"{name}.yaml").read_text(encoding="utf-8").split("\noutput_dir", 1)[0]
    assert "NOT TUNED" in header
    shared = _shared_data()
    if shared is None:
        pytest.skip("benchmark data not found at <repo>/../shared/data or /work/shared/data")
    # Run "from the repository root" of a clone that has shared/ beside it, as CI lays them out.
    (tmp_path / "clone").mkdir()
    (tmp_path / "shared").symlink_to(shared.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "clone")
    data_folder = Path(config.data.path)
    assert (data_folder / "sequences.txt").is_file() and (data_folder / config.data.items_file).is_file()
