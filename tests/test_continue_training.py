"""Issue 18 item 6, keeping a served model current: `training.init_from` / `finetune.py --init_from` continues a
saved model on new interactions; old items keep their ids and vectors, new items are added, bad folders are refused."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from conftest import tiny_overrides, write_planted_data
from llmrec import Recommender
from llmrec.config import load_config
from llmrec.errors import ConfigError, ModelFolderError
from llmrec.modeling.text_encoding import embed_item_texts
from llmrec.training import run_finetune

REPO = Path(__file__).resolve().parents[1]
NEW_ITEMS = [f"n{n}" for n in range(5)]
NEW_USERS = [f"new-user-{n}" for n in range(10)]
RETITLED = "movie number 99,g0"


def write_grown_data(folder: Path) -> Path:
    """The planted data plus five new genre-1 items and ten new users who watch them after genre-1 items."""
    write_planted_data(folder)
    items = (folder / "items.csv").read_text().splitlines()
    assert items[1] == "i0,movie number 0,g0"
    items[1] = f"i0,{RETITLED}"  # an old item whose text was corrected meanwhile
    (folder / "items.csv").write_text("\n".join(items) + "\n")
    with open(folder / "items.csv", "a", newline="") as handle:
        writer = csv.writer(handle)
        for position, item_id in enumerate(NEW_ITEMS):
            writer.writerow([item_id, f"movie number {50 + position}", "g1"])
    with open(folder / "interactions.csv", "a", newline="") as handle:
        writer = csv.writer(handle)
        for user_number, user_id in enumerate(NEW_USERS):
            history = [f"i{20 + (user_number + step) % 20}" for step in range(4)] + NEW_ITEMS
            for step, item_id in enumerate(history):
                writer.writerow([user_id, item_id, 10**6 + 100 * user_number + step])
    return folder


def continued_config(data_dir: Path, encoder_dir: Path, output_dir: Path, init_from: Path, **training):
    overrides = tiny_overrides(data_dir, encoder_dir, output_dir)
    overrides["training"].update({"retrieval_epochs": 3, "rerank_epochs": 1, "init_from": str(init_from), **training})
    return overrides


@pytest.fixture(scope="module")
def continued_run(tmp_path_factory, trained_run, tiny_encoder_dir) -> tuple[Path, Path, dict]:
    base_dir, _ = trained_run
    data_dir = write_grown_data(tmp_path_factory.mktemp("grown"))
    output_dir = tmp_path_factory.mktemp("continued") / "model"
    results = run_finetune(load_config(overrides=continued_config(data_dir, tiny_encoder_dir, output_dir, base_dir)))
    return base_dir, output_dir, results


def test_continued_model_keeps_old_items_and_grows(continued_run):
    base_dir, output_dir, results = continued_run
    old, new = Recommender.from_pretrained(base_dir), Recommender.from_pretrained(output_dir)
    count = len(old.item_ids)
    assert new.item_ids[:count] == old.item_ids and list(new.item_ids[count:]) == NEW_ITEMS
    assert results["init_from"] == {"folder": str(base_dir), "items_kept": count, "items_added": len(NEW_ITEMS)}
    old_model, new_model = old.model, new.model
    # The ID table grew by the new items; old rows keep their shape, and the frozen encoder their text vectors,
    # except i0's, whose text changed.
    assert new_model.item_id_embeddings.weight.shape == (count + 1 + len(NEW_ITEMS), old_model.config.hidden_size)
    assert new_model.item_text_embeddings.shape[1] == old_model.item_text_embeddings.shape[1]
    torch.testing.assert_close(new_model.item_text_embeddings[2 : count + 1], old_model.item_text_embeddings[2:])
    assert new.item_texts[0] == "movie number 99 genre g0" != old.item_texts[0]
    torch.testing.assert_close(new_model.item_text_embeddings[1], embed_item_texts(new_model, new.tokenizer, [new.item_texts[0]])[0])
    assert not torch.allclose(new_model.item_text_embeddings[1], old_model.item_text_embeddings[1])
    # New items got the text vectors of their texts; those with training interactions are warm (leave-one-out
    # keeps n3 and n4, every new user's last two, for valid and test), and the old items stay as they were.
    expected = embed_item_texts(new_model, new.tokenizer, list(new.item_texts[count:]))
    torch.testing.assert_close(new_model.item_text_embeddings[count + 1 :], expected)
    assert new_model.warm_items[count + 1 :].tolist() == [True, True, True, False, False]
    assert new_model.warm_items[: count + 1].equal(old_model.warm_items)
    assert new_model.config.num_items == count + len(NEW_ITEMS)
    # Training went on from the saved weights: stage 1 starts from the old model's validation score, not from scratch.
    assert results["best_valid_epochs"]["retrieval"] is not None


def test_continued_model_serves_the_new_items(continued_run):
    _, output_dir, _ = continued_run
    served = Recommender.from_pretrained(output_dir)
    ranked = served.recommend(["i20", "i21", "i22"], k=3, filter=NEW_ITEMS)
    assert len(ranked) == 3 and {item for item, _ in ranked} <= set(NEW_ITEMS)
    # The new item's learned ID row is in the index: a user who watched the new items is served too.
    assert served.recommend(NEW_ITEMS[:2], k=5)


def test_continued_folder_hot_reloads_into_a_server(continued_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from llmrec.server.app import create_app

    base_dir, output_dir, _ = continued_run
    with TestClient(create_app(Recommender.from_pretrained(base_dir), source=base_dir)) as client:
        assert client.post("/recommend", json={"history": ["i20"], "filter": NEW_ITEMS}).status_code == 404
        reloaded = client.post("/admin/reload", json={"path": str(output_dir)})
        assert reloaded.status_code == 200, reloaded.text
        answer = client.post("/recommend", json={"history": ["i20"], "k": 2, "filter": NEW_ITEMS})
        assert answer.status_code == 200 and {item["item_id"] for item in answer.json()["items"]} <= set(NEW_ITEMS)


def test_align_catalogue_keeps_the_saved_order_and_appends_new_items():
    import datasets

    from llmrec.data import InteractionData
    from llmrec.training.continuation import align_catalogue

    interactions = datasets.Dataset.from_dict({"user_id": ["u"], "item_id": ["d"], "timestamp": [1.0]})
    items = datasets.Dataset.from_dict({"item_id": ["c", "d", "a"], "text": ["C", "D", "A new"]})
    aligned = align_catalogue(InteractionData(interactions, items), ("a", "b", "c"), ("A", "B", "C"))
    assert aligned.items["item_id"] == ["a", "b", "c", "d"]
    assert aligned.items["text"] == ["A new", "B", "C", "D"]  # b is not in the data: it keeps the model's text
    assert aligned.interactions is interactions


# ----- bad folders and mismatched settings ------------------------------------------------------------------


@pytest.fixture()
def base_folder(trained_run) -> Path:
    return trained_run[0]


def _config(planted_data_dir, tiny_encoder_dir, tmp_path, init_from, **model):
    overrides = continued_config(planted_data_dir, tiny_encoder_dir, tmp_path / "out", init_from)
    overrides["model"].update(model)
    return load_config(overrides=overrides)


def test_missing_and_foreign_folders_are_refused(tmp_path, planted_data_dir, tiny_encoder_dir):
    with pytest.raises(ConfigError, match="training.init_from .*missing.* is not a folder"):
        run_finetune(_config(planted_data_dir, tiny_encoder_dir, tmp_path, tmp_path / "missing"))
    # The bare encoder is a model folder, but not an llmrec one.
    with pytest.raises(ConfigError, match="not an llmrec model folder .*model_type 'bert'.* set model.encoder instead"):
        run_finetune(_config(planted_data_dir, tiny_encoder_dir, tmp_path, tiny_encoder_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="not an llmrec model folder: config.json is missing"):
        run_finetune(_config(planted_data_dir, tiny_encoder_dir, tmp_path, empty))
    assert not (tmp_path / "out").exists()


def test_other_model_settings_are_refused(tmp_path, planted_data_dir, tiny_encoder_dir, base_folder):
    with pytest.raises(ConfigError, match=r"model.hidden_size: 32 in the folder, 16 now.*Set them to the folder's values"):
        run_finetune(_config(planted_data_dir, tiny_encoder_dir, tmp_path, base_folder, hidden_size=16))
    with pytest.raises(ConfigError, match=r"model.user_num_layers: 2 in the folder, 1 now"):
        run_finetune(_config(planted_data_dir, tiny_encoder_dir, tmp_path, base_folder, user_num_layers=1))


def test_another_encoder_is_refused(tmp_path, planted_data_dir, tiny_encoder_dir, base_folder):
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_encoder_dir, other)
    config = BertConfig.from_pretrained(tiny_encoder_dir)
    config.hidden_size, config.intermediate_size = 16, 32
    BertModel(config).save_pretrained(other)
    with pytest.raises(ConfigError, match=r"model.encoder: '.*tiny-bert.*' in the folder, '.*other-bert' now"):
        run_finetune(_config(planted_data_dir, other, tmp_path, base_folder))


def test_a_broken_llmrec_folder_is_refused_with_its_problem(tmp_path, planted_data_dir, tiny_encoder_dir, base_folder):
    broken = tmp_path / "broken"
    shutil.copytree(base_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFolderError, match=r"training.init_from .*broken cannot be loaded: .*model.safetensors"):
        run_finetune(_config(planted_data_dir, tiny_encoder_dir, tmp_path, broken))


def test_script_init_from_sets_the_config_and_reports_errors(tmp_path, planted_data_dir, tiny_encoder_dir):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(json.dumps(tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "out")))
    completed = subprocess.run(
        [sys.executable, "scripts/finetune.py", "--config", str(config_file), "--init_from", str(tmp_path / "nowhere")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 2
    assert f"training.init_from {tmp_path / 'nowhere'} is not a folder" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_init_from_is_a_config_key_with_help():
    from dataclasses import fields

    from llmrec.config import TrainingSettings

    field = next(spec for spec in fields(TrainingSettings) if spec.name == "init_from")
    assert "saved llmrec model folder" in field.metadata["help"]
    assert load_config(overrides=["--training.init_from", "runs/x"]).training.init_from == "runs/x"
    with pytest.raises(ConfigError, match="training.init_from is empty"):
        load_config(overrides=["--training.init_from="])
