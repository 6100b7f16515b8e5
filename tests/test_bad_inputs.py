"""Every bad input gets an llmrec exception that names the file/row/field and the fix, or a documented,
logged repair; never a pandas/pyarrow traceback, a hang or a silently wrong answer (issue 5)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytest

from llmrec.config import DataConfig, load_config
from llmrec.data import InteractionData, build_split, load_interaction_data
from llmrec.errors import ConfigError, DataError, LlmRecError

HEADER = "user_id,item_id,timestamp\n"
ITEMS = "item_id,title\n1,A\n2,B\n3,C\n"
THREE_EACH = HEADER + "u1,1,1\nu1,2,2\nu1,3,3\nu2,3,1\nu2,2,2\nu2,1,3\n"  # enough for leave-one-out


def _data_config(tmp_path: Path, **overrides: Any) -> DataConfig:
    settings = {"format": "auto", "path": str(tmp_path), "interactions_file": "inter.csv", "items_file": "items.csv",
                "rating_column": None, "item_text_template": "{title}"}
    settings.update(overrides)
    return DataConfig(**settings)


def _write(tmp_path: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


def _load(files: dict[str, str | bytes], **overrides: Any) -> Callable[[Path], Any]:
    """A case body: write the files into tmp_path, then load them with the given DataConfig overrides."""
    def run(tmp_path: Path) -> InteractionData:
        _write(tmp_path, files)
        return load_interaction_data(_data_config(tmp_path, **overrides))
    return run


def _split(files: dict[str, str | bytes], split: str = "leave_one_out") -> Callable[[Path], Any]:
    def run(tmp_path: Path) -> Any:
        config = _data_config(tmp_path, split=split)
        _write(tmp_path, files)
        return build_split(load_interaction_data(config), config)
    return run


def _config(overrides: Any) -> Callable[[Path], Any]:
    return lambda tmp_path: load_config(overrides=overrides)


def _missing_encoder(tmp_path: Path) -> Any:
    from llmrec.training.pipeline import resolve_encoder

    return resolve_encoder(load_config(overrides={"model": {"encoder": str(tmp_path / "no-such-encoder")}}))


def _folder_as_file(tmp_path: Path) -> Any:
    (tmp_path / "inter.csv").mkdir()
    _write(tmp_path, {"items.csv": ITEMS})
    return load_interaction_data(_data_config(tmp_path))


ERROR_CASES = [
    # --- files and folders ---
    ("missing-interactions-file", _load({"items.csv": ITEMS}), DataError,
     ["data.interactions_file", "inter.csv does not exist"]),
    ("missing-items-file", _load({"inter.csv": THREE_EACH}), DataError, ["data.items_file", "items.csv does not exist"]),
    ("missing-folder", lambda tmp_path: load_interaction_data(DataConfig(path=str(tmp_path / "gone"))), DataError,
     ["data.path", "gone does not exist"]),
    ("folder-instead-of-file", _folder_as_file, DataError, ["data.interactions_file", "inter.csv is a folder"]),
    # --- delimiter ---
    ("semicolon-read-as-csv", _load({"inter.csv": "user_id;item_id;timestamp\nu1;1;1\n", "items.csv": ITEMS}), DataError,
     ["inter.csv", "found one column 'user_id;item_id;timestamp'", "is the delimiter ';'?", "data.delimiter: ';'"]),
    ("tab-read-as-csv", _load({"inter.csv": "user_id\titem_id\ttimestamp\nu1\t1\t1\n", "items.csv": ITEMS}), DataError,
     ["inter.csv", "is the delimiter '\\t'?", "data.delimiter: tab"]),
    ("semicolon-items-with-a-comma", _load({"inter.csv": THREE_EACH, "items.csv": "item_id;title\n1;A, B\n2;C\n"}),
     DataError, ["items.csv line 2 has 2 ','-separated fields but the header has 1", "is the delimiter ';'?"]),
    ("unquoted-delimiter-in-first-row", _load({"inter.csv": THREE_EACH, "items.csv": "item_id,title\n1,A, B\n2,C\n"}),
     DataError, ["items.csv line 2 has 3 ','-separated fields but the header has 2", "quoted"]),
    ("unquoted-delimiter-in-later-row", _load({"inter.csv": THREE_EACH, "items.csv": "item_id,title\n1,A\n2,B, C\n"}),
     DataError, ["items.csv could not be parsed as ','-separated", "line 3", "quoted"]),
    # --- columns ---
    ("misnamed-user-column", _load({"inter.csv": "userId,item_id,timestamp\nu1,1,1\n", "items.csv": ITEMS}), DataError,
     ["inter.csv", "'user_id' (data.user_column)", "found columns ['userId', 'item_id', 'timestamp']",
      "Did you mean data.user_column: userId"]),
    ("missing-timestamp-column", _load({"inter.csv": "user_id,item_id,time\nu1,1,1\n", "items.csv": ITEMS}), DataError,
     ["'timestamp' (data.timestamp_column)", "data.timestamp_column: time", "data.timestamp_column: null"]),
    ("misnamed-item-id-in-items", _load({"inter.csv": THREE_EACH, "items.csv": "id,title\n1,A\n2,B\n"}), DataError,
     ["items.csv", "'item_id' (data.item_column)", "found columns ['id', 'title']"]),
    ("template-field-not-a-column", _load({"inter.csv": THREE_EACH, "items.csv": ITEMS}, item_text_template="{name}"),
     DataError, ["data.item_text_template", "['name']", "items.csv"]),
    # --- values ---
    ("non-numeric-timestamp", _load({"inter.csv": HEADER + "u1,1,5\nu1,2,yesterday\n", "items.csv": ITEMS}), DataError,
     ["inter.csv", "'timestamp'", "'yesterday' at row 2", "Unix seconds or ISO 8601"]),
    ("bad-iso-date", _load({"inter.csv": HEADER + "u1,1,2020-01-31\nu1,2,2020-02-30\nu1,3,2020-03-01\n",
                            "items.csv": ITEMS}), DataError,
     ["inter.csv", "'2020-02-30' at row 2", "not an ISO 8601 date/time"]),
    ("empty-timestamp", _load({"inter.csv": HEADER + "u1,1,\n", "items.csv": ITEMS}), DataError,
     ["inter.csv", "(empty) at row 1"]),
    ("empty-user-id", _load({"inter.csv": HEADER + ",1,5\n", "items.csv": ITEMS}), DataError,
     ["inter.csv", "'user_id' is empty at row 1"]),
    ("no-interaction-item-is-known", _load({"inter.csv": HEADER + "u1,7,1\nu1,8,2\n", "items.csv": ITEMS}), DataError,
     ["None of the item ids", "inter.csv", "items.csv", "'7'"]),
    ("catalogue-of-one-item", _load({"inter.csv": HEADER + "u1,1,1\nu2,1,2\n", "items.csv": "item_id,title\n1,A\n"}),
     DataError, ["items.csv", "only 1 item", "nothing to recommend"]),
    ("latin1-items-read-as-utf8", _load({"inter.csv": THREE_EACH, "items.csv": b"item_id,title\n1,Caf\xe9\n2,B\n"}),
     DataError, ["items.csv", "not valid utf-8", "byte 0xe9 at byte offset 19 (line 2)", "data.encoding: latin-1"]),
    ("latin1-jsonl", _load({"inter.jsonl": b'{"user_id": 1, "item_id": 1, "timestamp": 1, "note": "\xe9"}\n',
                            "items.jsonl": '{"item_id": 1, "title": "A"}\n'},
                           interactions_file="inter.jsonl", items_file="items.jsonl"), DataError,
     ["inter.jsonl", "byte 0xe9 at byte offset 54 (line 1)", "data.encoding"]),
    # --- splits ---
    ("nobody-has-three-interactions", _split({"inter.csv": HEADER + "u1,1,1\nu1,2,2\nu2,3,1\n", "items.csv": ITEMS}),
     DataError, ["leave_one_out split has no valid or test example", "3 or more (warm) interactions"]),
    ("temporal-windows-without-history", _split({"inter.csv": HEADER + "u1,1,1\nu2,2,1\nu3,3,1\n", "items.csv": ITEMS},
                                                split="temporal"),
     DataError, ["temporal split has no valid or test example", "data.temporal_valid_fraction"]),
    # --- data settings (checked before any file is read) ---
    ("unknown-encoding", _load({}, encoding="latin-9000"), ConfigError, ["data.encoding 'latin-9000'"]),
    ("empty-delimiter", _load({}, delimiter=""), ConfigError, ["data.delimiter", "''"]),
    ("same-column-twice", _load({}, item_column="user_id"), ConfigError,
     ["data.user_column and data.item_column", "'user_id'"]),
    # --- configuration ---
    ("typo-in-key", _config(["--retrieval.num_candidate", "5"]), ConfigError,
     ["'num_candidate'", "section 'retrieval'", "Did you mean 'num_candidates'"]),
    ("typo-in-section", _config(["--modle.dropout", "0.1"]), ConfigError, ["'modle'", "Did you mean 'model'"]),
    ("evaluation-k-typo", _config({"evaluation": {"k": [10]}}), ConfigError, ["Did you mean 'ks'"]),
    ("int-field-given-text", _config(["--training.seed", "abc"]), ConfigError, ["training.seed must be an integer", "'abc'"]),
    ("int-field-given-non-yaml", _config(["--training.seed", "@"]), ConfigError, ["training.seed must be an integer", "'@'"]),
    ("float-field-given-text", _config(["--training.retrieval_learning_rate", "fast"]), ConfigError,
     ["training.retrieval_learning_rate must be a number", "'fast'"]),
    ("nan-learning-rate", _config(["--training.rerank_learning_rate", ".nan"]), ConfigError,
     ["training.rerank_learning_rate must be a finite number"]),
    ("list-of-text-for-ks", _config(["--evaluation.ks", "[ten]"]), ConfigError, ["evaluation.ks[0] must be an integer"]),
    ("section-not-a-mapping", _config({"training": 5}), ConfigError, ["training must be a mapping", "TrainingSettings"]),
    ("bool-given-text", _config(["--retrieval.exclude_history", "maybe"]), ConfigError,
     ["retrieval.exclude_history must be true or false"]),
    ("k-zero", _config(["--evaluation.ks", "[0, 10]"]), ConfigError, ["evaluation.ks must be positive", "[0, 10]"]),
    ("k-negative", _config(["--evaluation.ks", "[-5]"]), ConfigError, ["evaluation.ks must be positive"]),
    ("k-beyond-candidates", _config(["--evaluation.ks", "[500]"]), ConfigError,
     ["go beyond retrieval.num_candidates (100)"]),
    ("num-candidates-zero", _config(["--retrieval.num_candidates", "0"]), ConfigError,
     ["retrieval.num_candidates must be positive, got 0"]),
    ("num-candidates-negative", _config(["--retrieval.num_candidates", "-3"]), ConfigError,
     ["retrieval.num_candidates must be positive, got -3"]),
    ("negative-learning-rate", _config(["--training.retrieval_learning_rate", "-0.001"]), ConfigError,
     ["training.retrieval_learning_rate must be positive"]),
    ("zero-rerank-learning-rate", _config(["--training.rerank_learning_rate", "0"]), ConfigError,
     ["training.rerank_learning_rate must be positive"]),
    ("negative-weight-decay", _config(["--training.weight_decay", "-0.1"]), ConfigError,
     ["training.weight_decay must be >= 0"]),
    ("lora-r-zero", _config(["--lora.r", "0"]), ConfigError, ["lora.r must be a positive integer, got 0"]),
    ("lora-alpha-zero", _config(["--lora.lora_alpha", "0"]), ConfigError, ["lora.lora_alpha must be positive"]),
    ("lora-alpha-old-name", _config(["--lora.alpha", "16"]), ConfigError, ["'lora.alpha' is now 'lora.lora_alpha'"]),
    ("lora-dropout-one", _config(["--lora.lora_dropout", "1.0"]), ConfigError, ["lora.lora_dropout must be in [0, 1), got 1.0"]),
    ("lora-dropout-old-name", _config(["--lora.dropout", "0.1"]), ConfigError, ["'lora.dropout' is now 'lora.lora_dropout'"]),
    ("lora-dropout-negative", _config(["--lora.lora_dropout", "-0.1"]), ConfigError, ["lora.lora_dropout must be in [0, 1)"]),
    ("model-dropout-above-one", _config(["--model.dropout", "1.5"]), ConfigError, ["model.dropout must be in [0, 1)"]),
    ("evaluation-batch-size-zero", _config(["--evaluation.batch_size", "0"]), ConfigError,
     ["evaluation.batch_size must be positive"]),
    ("max-item-text-chars-zero", _config(["--data.max_item_text_chars", "0"]), ConfigError,
     ["data.max_item_text_chars must be positive"]),
    ("unknown-split", _config(["--data.split", "random"]), ConfigError, ["data.split must be one of", "'random'"]),
    ("encoder-path-missing", _missing_encoder, ConfigError, ["no-such-encoder"]),
]


@pytest.mark.parametrize("case, error_type, expected", [case[1:] for case in ERROR_CASES],
                         ids=[case[0] for case in ERROR_CASES])
def test_bad_input_raises_an_llmrec_error_naming_the_problem(tmp_path: Path, case, error_type, expected) -> None:
    with pytest.raises(error_type) as raised:
        case(tmp_path)
    assert isinstance(raised.value, LlmRecError)
    message = str(raised.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def _texts(data: InteractionData) -> list[str]:
    return data.items["text"]


REPAIR_CASES = [
    # id, case, what the result must be, fragments of the warning/info log (empty: nothing to log)
    ("duplicate-rows-dropped", _load({"inter.csv": HEADER + "u1,1,1\nu1,1,1\nu1,1,1\nu1,1,2\n", "items.csv": ITEMS}),
     lambda data: data.interactions["timestamp"] == [1.0, 2.0],
     ["Dropping 2 duplicate interaction row(s)", "inter.csv", "user 'u1', item '1'"]),
    ("unknown-items-dropped", _load({"inter.csv": HEADER + "u1,1,1\nu1,9,2\nu1,2,3\n", "items.csv": ITEMS}),
     lambda data: data.interactions["item_id"] == ["1", "2"], ["Dropping 1 interaction(s)", "items.csv", "['9']"]),
    ("empty-item-text-uses-the-id", _load({"inter.csv": THREE_EACH, "items.csv": "item_id,title\n1,\n2,  \n3,C\n"}),
     lambda data: _texts(data) == ["1", "2", "C"],
     ["2 item(s)", "items.csv", "render to an empty text", "['1', '2']", "item id is used"]),
    ("huge-item-text-truncated", _load({"inter.csv": THREE_EACH, "items.csv": f"item_id,title\n1,{'x' * 1_000_000}\n2,B\n3,C\n"},
                                       max_item_text_chars=100),
     lambda data: [len(text) for text in _texts(data)] == [100, 1, 1],
     ["1 item text(s)", "items.csv", "data.max_item_text_chars=100", "longest: 1000000"]),
    ("latin1-with-data-encoding", _load({"inter.csv": THREE_EACH, "items.csv": b"item_id,title\n1,Caf\xe9\n2,B\n3,C\n"},
                                        encoding="latin-1"),
     lambda data: _texts(data)[0] == "Café", []),
    ("iso-timestamps-accepted", _load({"inter.csv": HEADER + "u1,1,1970-01-01T00:01:00\nu1,2,1970-01-02\n"
                                                             "u1,3,1970-01-01T02:00:00+01:00\n", "items.csv": ITEMS}),
     lambda data: data.interactions["timestamp"] == [60.0, 86400.0, 3600.0], ["ISO 8601", "naive times read as UTC"]),
    ("semicolon-with-data-delimiter", _load({"inter.csv": "user_id;item_id;timestamp\nu1;1;1\nu1;2;2\n",
                                             "items.csv": "item_id;title\n1;A, the first\n2;B\n"}, delimiter=";"),
     lambda data: _texts(data) == ["A, the first", "B"], []),
    ("trailing-delimiter-ignored", _load({"inter.csv": "user_id,item_id,timestamp,\nu1,1,1,\nu1,2,2,\n",
                                          "items.csv": "item_id,title,\n1,A,\n2,B,\n"}),
     lambda data: data.interactions["item_id"] == ["1", "2"] and _texts(data) == ["A", "B"], []),
    ("tab-delimiter-by-name", _load({"inter.csv": "user_id\titem_id\ttimestamp\nu1\t1\t1\n",
                                     "items.csv": "item_id\ttitle\n1\tA\n2\tB\n"}, delimiter="tab"),
     lambda data: data.interactions["item_id"] == ["1"], []),
    ("single-interaction-users-only-train", _split({"inter.csv": THREE_EACH + "u3,1,9\nu4,2,9\nu4,3,10\n", "items.csv": ITEMS}),
     lambda split: (split.user_ids, [len(sequence) for sequence in split.train_sequences], split.test.user_indices)
     == (["u1", "u2", "u3", "u4"], [1, 1, 1, 2], [0, 1]),
     ["2 user(s) have fewer than 3 interactions (1 of them a single one)", "no valid/test example"]),
]


@pytest.mark.parametrize("case, check, logged", [case[1:] for case in REPAIR_CASES], ids=[case[0] for case in REPAIR_CASES])
def test_imperfect_input_is_repaired_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture, case, check,
                                                logged) -> None:
    with caplog.at_level(logging.INFO, logger="llmrec"):
        result = case(tmp_path)
    assert check(result)
    for fragment in logged:
        assert fragment in caplog.text, f"{fragment!r} not logged; log was {caplog.text!r}"


def test_movielens_item_file_reencoded_as_utf8_is_not_garbled(tmp_path: Path) -> None:
    """The official u.item is latin-1; a UTF-8 copy must not come out as 'CafÃ©'."""
    flags = "|".join(["0"] * 19)
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n1\t2\t4\t20\n", encoding="utf-8")
    (tmp_path / "u.item").write_text(f"1|Café (1993)|01-Jan-1993||url|{flags}\n2|Heat (1995)|01-Jan-1995||url|{flags}\n",
                                     encoding="utf-8")
    data = load_interaction_data(DataConfig(format="movielens", path=str(tmp_path)))
    assert data.items["movie_title"] == ["Café", "Heat"]


def test_catalogue_of_one_item_is_rejected_by_build_split_too() -> None:
    import datasets

    data = InteractionData(
        datasets.Dataset.from_dict({"user_id": ["u1"], "item_id": ["a"], "timestamp": [1.0]}),
        datasets.Dataset.from_dict({"item_id": ["a"], "text": ["A"]}),
    )
    with pytest.raises(DataError, match=r"catalogue has 1 item\(s\) \(\['a'\]\); there is nothing to recommend"):
        build_split(data, DataConfig())
