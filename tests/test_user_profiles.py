"""User attributes -> profile texts (RecBole .user, MovieLens u.user, tables), and profiles through run_finetune."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import ITEMS_PER_GENRE, NUM_GENRES, NUM_USERS, tiny_overrides
from llmrec import Recommender
from llmrec.config import DataConfig, load_config
from llmrec.data import build_split, load_interaction_data
from llmrec.data.user_text import render_user_profiles
from llmrec.errors import ConfigError, DataError
from llmrec.training import run_finetune

FIXTURES = Path(__file__).parent / "fixtures"
RECBOLE_USERS = ("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                 "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n")
MOVIELENS_USERS = "1|24|M|technician|85711\n2|53|F|other|94043\n"


def _recbole_folder(tmp_path: Path, users: str = RECBOLE_USERS) -> Path:
    folder = tmp_path / "recbole"
    shutil.copytree(FIXTURES / "recbole", folder)
    (folder / "tiny.user").write_text(users)
    return folder


def _movielens_folder(tmp_path: Path, users: str = MOVIELENS_USERS) -> Path:
    folder = tmp_path / "movielens"
    shutil.copytree(FIXTURES / "movielens", folder)
    (folder / "u.user").write_text(users, encoding="latin-1")
    return folder


# ----- reading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["recbole", "movielens"])
def test_users_file_is_found_in_recbole_and_movielens_folders(tmp_path, layout):
    if layout == "recbole":
        config = DataConfig(format="auto", path=str(_recbole_folder(tmp_path)), dataset_name="tiny")
    else:
        config = DataConfig(format="movielens", path=str(_movielens_folder(tmp_path)))
    data = load_interaction_data(config)
    # User 3 interacts but has no row in the users file: no profile, not an error.
    assert data.user_profiles == {"1": "24-year-old male technician", "2": "53-year-old female other"}
    assert data.users.column_names == ["user_id", "profile", "age", "gender", "occupation", "zip_code"]
    assert data.users_note is None
    split = build_split(data, config)
    assert dict(zip(split.user_ids, split.user_profiles)) == {"1": "24-year-old male technician",
                                                              "2": "53-year-old female other", "3": None}


def test_folders_without_a_users_file_have_no_profiles_and_say_why(tmp_path):
    data = load_interaction_data(DataConfig(format="movielens", path=str(FIXTURES / "movielens")))
    assert data.users is None and data.user_profiles == {}
    assert "no users file was found" in data.users_note
    assert build_split(data, DataConfig(format="movielens")).user_profiles == []


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_users_file_named_in_the_config(tmp_path, suffix):
    users = pd.DataFrame({"user_id": ["1", "2"], "job": ["nurse", "  "], "city": ["Lyon", ""]})
    path = tmp_path / f"people.{suffix}"
    if suffix == "csv":
        users.to_csv(path, index=False)
    elif suffix == "jsonl":
        users.to_json(path, orient="records", lines=True)
    else:
        users.to_parquet(path)
    config = DataConfig(format="movielens", path=str(FIXTURES / "movielens"), users_file=str(path),
                        user_profile_template="{job} from {city}")
    # User 2's fields are blank: the template's literal text alone is no profile.
    assert load_interaction_data(config).user_profiles == {"1": "nurse from Lyon"}


def test_users_file_resolves_against_data_path(tmp_path):
    folder = shutil.copytree(FIXTURES / "tabular", tmp_path / "tabular")
    (folder / "users.tsv").write_text("user_id\tlikes\n1\tjazz\n")
    config = DataConfig(format="tsv", path=str(folder), interactions_file="inter.tsv", items_file="items.tsv",
                        users_file="users.tsv", user_profile_template="likes {likes}")
    assert load_interaction_data(config).user_profiles == {"1": "likes jazz"}


def test_profile_text_reads_gender_codes_as_words():
    users = pd.DataFrame({"age": ["24", "31", "40", ""], "Gender": ["M", "f", "X", ""], "occupation": ["writer", "", "artist", ""]})
    assert render_user_profiles(users, "{age}-year-old {Gender} {occupation}", "users.csv") == [
        "24-year-old male writer", "31-year-old female", "40-year-old X artist", None]
    sex = pd.DataFrame({"sex": ["F"], "job": ["M"]})  # only a gender/sex column is recoded
    assert render_user_profiles(sex, "{sex} {job}", "users.csv") == ["female M"]


# ----- bad input -------------------------------------------------------------------------------------


def test_missing_users_file_named_in_config(tmp_path):
    config = DataConfig(format="movielens", path=str(FIXTURES / "movielens"), users_file="nowhere.csv")
    with pytest.raises(DataError, match=r"data.users_file .*nowhere.csv does not exist"):
        load_interaction_data(config)


def test_users_file_without_id_column(tmp_path):
    (tmp_path / "users.csv").write_text("uid,age,gender,occupation\n1,24,M,writer\n")
    config = DataConfig(format="movielens", path=str(FIXTURES / "movielens"), users_file=str(tmp_path / "users.csv"))
    with pytest.raises(DataError, match=r"users.csv is missing column\(s\) 'user_id' \(data.user_column\).*uid"):
        load_interaction_data(config)


def test_users_file_with_duplicate_ids(tmp_path):
    (tmp_path / "users.csv").write_text("user_id,age,gender,occupation\n1,24,M,writer\n2,30,F,artist\n1,25,M,writer\n")
    config = DataConfig(format="movielens", path=str(FIXTURES / "movielens"), users_file=str(tmp_path / "users.csv"))
    with pytest.raises(DataError, match=r"users.csv lists user id\(s\) \['1'\] more than once"):
        load_interaction_data(config)


@pytest.mark.parametrize("template, message", [
    ("{age} {hobby}", r"user_profile_template refers to column\(s\) \['hobby'\] that .*users.csv does not have"),
    ("{} likes films", r"user_profile_template .* has a positional field"),
    ("plain text", r"user_profile_template .* names no column"),
])
def test_users_template_must_fit_the_file(tmp_path, template, message):
    (tmp_path / "users.csv").write_text("user_id,age,gender,occupation\n1,24,M,writer\n")
    config = DataConfig(format="movielens", path=str(FIXTURES / "movielens"), users_file=str(tmp_path / "users.csv"),
                        user_profile_template=template)
    with pytest.raises(DataError, match=message):
        load_interaction_data(config)


def test_a_found_users_file_that_does_not_fit_is_skipped_with_a_warning(tmp_path, caplog):
    folder = _recbole_folder(tmp_path, users="user_id:token\tcity:token\n1\tLyon\n")
    with caplog.at_level(logging.WARNING, logger="llmrec.data.loaders"):
        data = load_interaction_data(DataConfig(path=str(folder), dataset_name="tiny"))
    assert data.users is None and "could not be used" in data.users_note and "['age', 'gender', 'occupation']" in data.users_note
    assert "Not using the users file" in caplog.text
    # Named in the config, the same file is an error.
    with pytest.raises(DataError, match="user_profile_template refers to column"):
        load_interaction_data(DataConfig(path=str(folder), dataset_name="tiny", users_file="tiny.user"))


# ----- training with profiles ------------------------------------------------------------------------


def _genre_of_user(user: int) -> int:
    return user % NUM_GENRES  # as write_planted_data assigns them


def _profile(genre: int) -> str:
    return f"movie about genre g{genre}"


def _write_planted_users(folder: Path, skip: tuple[int, ...] = ()) -> Path:
    rows = [(f"u{user}", f"g{_genre_of_user(user)}") for user in range(NUM_USERS) if user not in skip]
    path = folder / "users.csv"
    pd.DataFrame(rows, columns=["user_id", "likes"]).to_csv(path, index=False)
    return path


def _profile_config(planted_data_dir, tiny_encoder_dir, output_dir, users_file, **model):
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, output_dir)
    overrides["data"].update({"split": "cold_users", "cold_user_fraction": 0.25, "cold_user_history_length": 2,
                              "users_file": str(users_file), "user_profile_template": "movie about genre {likes}"})
    overrides["model"].update({"use_user_profiles": True, **model})
    overrides["training"].update({"retrieval_epochs": 12, "rerank_epochs": 1, "cpu_threads": 1, "profile_epochs": 30})
    return load_config(overrides=overrides)


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory, planted_data_dir, tiny_encoder_dir):
    """Cold-user split of the planted data, a profile per user except u5 (cold) and u2 (warm), profiles on."""
    users_file = _write_planted_users(tmp_path_factory.mktemp("users"), skip=(5, 2))
    config = _profile_config(planted_data_dir, tiny_encoder_dir, tmp_path_factory.mktemp("profile-run"), users_file)
    split = build_split(load_interaction_data(config.data), config.data)
    assert 5 in split.cold_user_indices and 2 not in split.cold_user_indices and split.user_profiles[5] is None
    return config, split, run_finetune(config)


def test_run_finetune_evaluates_cold_users_with_and_without_profiles(profile_run):
    config, split, results = profile_run
    cold = len(split.cold_test)
    saved = json.loads((Path(config.output_dir) / "eval_results.json").read_text())
    for name, users in (("cold_test", cold), ("cold_test_with_profile", cold), ("cold_test_profile_only", cold - 1)):
        assert set(saved[name]) == {"popularity", "retrieval", "rerank"}
        assert all(metrics["num_users"] == users for metrics in saved[name].values())
    assert saved["timings"]["profile_training_seconds"] > 0
    # The profile fit is the trainer's third stage: its epochs, with early stopping on valid NDCG@10.
    losses = saved["profile_training_losses"]
    assert 2 <= len(losses) <= config.training.profile_epochs and losses[-1] < losses[0]
    best = saved["best_valid_epochs"]["profiles"]
    assert best is not None and 0 <= best <= len(losses)
    # The profile names the user's genre: alone it finds the target far better than popularity (HR@10 = 10 of
    # the genre's 20 items at best), and it adds to a two-item history.
    profile_only = saved["cold_test_profile_only"]
    assert profile_only["retrieval"]["hr@10"] > 0.3 > 2 * profile_only["popularity"]["hr@10"]
    assert saved["cold_test_with_profile"]["retrieval"]["hr@10"] >= saved["cold_test"]["retrieval"]["hr@10"]
    assert saved["config"]["model"]["use_user_profiles"] is True


def test_profile_only_cold_user_gets_the_planted_genre_from_the_saved_model(profile_run):
    config, split, _ = profile_run
    recommender = Recommender.from_pretrained(config.output_dir)
    assert recommender.model.config.use_user_profiles
    for user in split.cold_user_indices:
        if split.user_profiles[user] is None:
            continue
        genre = _genre_of_user(int(split.user_ids[user][1:]))
        recommended = recommender.recommend([], k=10, profile=split.user_profiles[user])
        in_genre = sum((recommender.item_index[item] - 1) // ITEMS_PER_GENRE == genre for item, _ in recommended)
        assert in_genre >= 8, (split.user_ids[user], recommended)


def test_profile_evaluation_reproduces_the_run_and_can_run_twice(profile_run):
    """evaluate_systems on the saved model gives the run's cold-user metrics, and a second pass gives them again:
    the profile scorers pair each history with its profile by position, not by a cursor good for one pass."""
    from llmrec.evaluation import evaluate_systems, split_evaluations
    from llmrec.training.profiles import embed_user_profiles

    config, split, results = profile_run
    recommender = Recommender.from_pretrained(config.output_dir)
    embeddings, has_profile = embed_user_profiles(recommender.model, recommender.tokenizer, split.user_profiles,
                                                  config.training.encode_batch_size)
    evaluations = [evaluation for evaluation in split_evaluations(split, recommender.pipeline, split.item_popularity(),
                                                                  embeddings, has_profile)
                   if evaluation[0] in ("cold_test_with_profile", "cold_test_profile_only")]
    settings = {"ks": config.evaluation.ks, "batch_size": 3,  # several batches per pass
                "item_text_embeddings": recommender.pipeline.item_text_embeddings, "item_popularity": split.item_popularity()}
    first = evaluate_systems(evaluations, split.num_items, **settings)
    assert list(first) == ["cold_test_with_profile", "cold_test_profile_only"]
    assert evaluate_systems(evaluations, split.num_items, **settings) == first
    for name, systems in first.items():
        for system, metrics in systems.items():
            assert metrics == pytest.approx(results[name][system], abs=1e-6), (name, system)


def test_profiles_on_without_profile_texts_fails_before_training(planted_data_dir, tiny_encoder_dir, tmp_path):
    config = _profile_config(planted_data_dir, tiny_encoder_dir, tmp_path / "run", tmp_path / "unused.csv")
    config.data.users_file = None
    with pytest.raises(ConfigError, match=r"use_user_profiles is on but there are no user profile texts.*no users file "
                                          r"was found.*data.users_file"):
        run_finetune(config)
    assert not (tmp_path / "run" / "eval_results.json").exists()


def test_profiles_without_a_validation_user_with_a_profile_fail_before_training():
    """The profile fit stops early on valid users' profiles: with none, it would have nothing to stop on."""
    from types import SimpleNamespace

    from llmrec.training.pipeline import _require_profiles

    split = SimpleNamespace(user_profiles=["likes g1", None], train_sequences=[[1, 2], [3, 4]],
                            valid=SimpleNamespace(user_indices=[1]))
    with pytest.raises(ConfigError, match="no validation user has a profile text.*data.users_file"):
        _require_profiles(SimpleNamespace(users_note=None), split)
    split.valid.user_indices = [0, 1]
    _require_profiles(SimpleNamespace(users_note=None), split)  # user 0 has both: nothing to refuse


def test_profile_settings_are_validated():
    with pytest.raises(ConfigError, match="training.profile_epochs"):
        load_config(overrides={"training": {"profile_epochs": 0}})
    with pytest.raises(ConfigError, match="training.profile_learning_rate"):
        load_config(overrides={"training": {"profile_learning_rate": -1}})
    defaults = load_config(Path(__file__).parent.parent / "configs" / "ml100k.yaml")
    assert defaults.model.use_user_profiles is False and defaults.data.users_file is None
