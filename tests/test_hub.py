"""A saved model as a Hub artefact: one self-contained folder, its model card, the upload, and safe loading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

from llmrec import ModelFolderError, Recommender
from llmrec.errors import HubUploadError
from llmrec.hub import files_to_upload, push_to_hub, render_model_card
from llmrec.modeling import LlmRecConfig
from llmrec.modeling.encoders import BUNDLED_ENCODER_ID
from llmrec.retrieval import ItemIndex

REPO = Path(__file__).resolve().parents[1]
HISTORIES = [["i0", "i1", "i2"], ["i41", "i42"], ["i77"], []]


def scores_of(recommender: Recommender) -> list:
    return recommender.recommend_batch(HISTORIES, k=10) + recommender.rerank_batch(HISTORIES[:3], [["i3", "i43", "i60"]] * 3)


def assert_same_scores(first: list, second: list) -> None:
    assert len(first) == len(second)
    for ranked_a, ranked_b in zip(first, second):
        assert [item for item, _ in ranked_a] == [item for item, _ in ranked_b]
        np.testing.assert_allclose([s for _, s in ranked_a], [s for _, s in ranked_b], rtol=0, atol=1e-6)


def front_matter(card_text: str) -> dict:
    assert card_text.startswith("---\n")
    return yaml.safe_load(card_text.split("---\n")[1])


@pytest.fixture(scope="module")
def model_folder(trained_run, tmp_path_factory) -> Path:
    """A private copy of the trained run's folder (other tests share the original)."""
    output_dir, _ = trained_run
    folder = tmp_path_factory.mktemp("hub") / "model"
    shutil.copytree(output_dir, folder)
    return folder


@pytest.fixture(scope="module")
def recommender(model_folder) -> Recommender:
    return Recommender.from_pretrained(model_folder)


# ----- the folder ------------------------------------------------------------------------------------


def test_folder_is_self_contained(recommender, model_folder, tmp_path):
    """Only the folder's own files are needed: move it elsewhere and it scores the same."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(model_folder, moved)
    assert_same_scores(scores_of(Recommender.from_pretrained(moved)), scores_of(recommender))
    names = set(files_to_upload(model_folder))
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "catalogue.parquet",
                     "item_index.faiss", "item_index.faiss.json", "README.md", "eval_results.json", "config.yaml"):
        assert required in names
    config = json.loads((model_folder / "config.json").read_text())
    assert config["model_type"] == "llmrec" and config["encoder_weights"] == "full" and config["llmrec_version"]
    assert "auto_map" not in config  # nothing to trust: the llmrec package is the code


def test_save_load_round_trip_is_exact(recommender, tmp_path):
    recommender.save_pretrained(tmp_path / "copy")
    copy = Recommender.from_pretrained(tmp_path / "copy")
    assert_same_scores(scores_of(copy), scores_of(recommender))
    assert copy.item_ids == recommender.item_ids and copy.item_texts == recommender.item_texts
    assert copy.eval_results == recommender.eval_results


def test_save_replaces_the_model_but_keeps_checkpoints_and_user_files(recommender, tmp_path):
    target = tmp_path / "run"
    (target / "checkpoints" / "retrieval-step-10").mkdir(parents=True)
    (target / "checkpoints" / "retrieval-step-10" / "state.bin").write_text("x")
    (target / "notes.txt").write_text("mine")
    # Stale output of an earlier LoRA save, which its config.json's manifest says llmrec wrote.
    (target / "encoder_adapter").mkdir()
    (target / "config.json").write_text(json.dumps(
        {"model_type": "llmrec", "file_checksums": {"encoder_adapter/adapter_model.safetensors": "0" * 64}}
    ))
    recommender.save_pretrained(target)
    assert (target / "checkpoints" / "retrieval-step-10" / "state.bin").read_text() == "x"
    assert (target / "notes.txt").read_text() == "mine"
    assert not (target / "encoder_adapter").exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")], "temporaries left behind"


# ----- model card -----------------------------------------------------------------------------------


def test_model_card_has_hub_metadata_and_the_real_metrics(trained_run, model_folder, planted_data_dir):
    _, results = trained_run
    card = (model_folder / "README.md").read_text()
    metadata = front_matter(card)
    assert metadata["library_name"] == "llmrec"
    assert {"recommendation", "llmrec"} <= set(metadata["tags"])
    assert metadata["datasets"] == [planted_data_dir.name.lower()]  # the data folder's name, as a Hub-style id
    (entry,) = metadata["model-index"]
    metrics = {metric["type"]: metric["value"] for metric in entry["results"][0]["metrics"]}
    # The accuracy metrics; num_users is bookkeeping, and the diversity ones (coverage@k...) stay in eval_results.json.
    accuracy = {name: value for name, value in results["test"]["rerank"].items() if name.split("@")[0] in ("ndcg", "hr", "mrr")}
    assert {"coverage@10", "ild@10", "popularity_percentile@10"} <= set(results["test"]["rerank"]) and len(accuracy) == 6
    for name, value in accuracy.items():
        assert metrics[name.replace("@", "_at_")] == pytest.approx(value, abs=1e-6)
    assert set(metrics) == {name.replace("@", "_at_") for name in accuracy}
    assert entry["results"][0]["dataset"]["split"] == "test"
    assert f"\n# {entry['name']}\n" in card and entry["name"]
    # The body's table carries every system's numbers, and the training config is included.
    assert f"{results['test']['popularity']['ndcg@10']:.4f}" in card
    assert f"{results['test']['rerank']['hr@10']:.4f}" in card
    assert "retrieval_epochs: 25" in card
    assert "## Limitations" in card and "## Intended use" in card


def test_model_card_names_a_hub_base_model_and_lora():
    config = LlmRecConfig(encoder_name_or_path=BUNDLED_ENCODER_ID, encoder_config={"model_type": "bert"}, encoder_weights="adapter")
    card = render_model_card(config, ["1", "2", "3"], training_config={"data": {"path": None, "split": "leave_one_out"}})
    metadata = front_matter(str(card))
    assert metadata["base_model"] == BUNDLED_ENCODER_ID
    assert metadata["datasets"] == ["movielens-100k"]
    assert {"peft", "lora"} <= set(metadata["tags"])
    assert "model-index" not in metadata  # no evaluation given, no metrics invented
    assert "encoder_adapter/" in str(card)


def test_model_card_of_a_cold_user_run_describes_its_split_and_lists_every_cold_evaluation():
    config = LlmRecConfig(encoder_name_or_path=BUNDLED_ENCODER_ID, encoder_config={"model_type": "bert"})
    metrics = {"ndcg@10": 0.1, "hr@10": 0.2, "mrr@10": 0.05, "ndcg@20": 0.12, "hr@20": 0.3, "mrr@20": 0.06, "num_users": 9.0}
    eval_results = {split: {"retrieval": metrics, "rerank": metrics}
                    for split in ("test", "valid", "cold_test", "cold_test_with_profile", "cold_test_profile_only")}
    card = str(render_model_card(config, ["1", "2", "3"], eval_results,
                                 training_config={"data": {"path": None, "split": "cold_users"}}))
    assert "Cold users: a share of the users is held out" in card and "temporal" not in card
    for split in ("cold_test_with_profile", "cold_test_profile_only"):
        assert f"| {split} |" in card


def test_bundled_encoder_is_recorded_by_hub_id():
    from llmrec.modeling import LlmRecModel
    from llmrec.modeling.encoders import bundled_encoder_path, locate_encoder

    bundled = bundled_encoder_path()
    model = LlmRecModel.from_encoder(bundled, num_items=2, hidden_size=8, user_num_heads=1, rerank_num_heads=1)
    assert model.config.encoder_name_or_path == BUNDLED_ENCODER_ID
    assert locate_encoder(BUNDLED_ENCODER_ID) == bundled


# ----- pushing --------------------------------------------------------------------------------------


class FakeHfApi:
    """Records what would go to the Hub."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs, self.token))

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs, self.token))


def test_push_uploads_the_folder_in_one_commit(model_folder, monkeypatch):
    (model_folder / "checkpoints").mkdir(exist_ok=True)
    (model_folder / "checkpoints" / "state.bin").write_text("x")
    FakeHfApi.calls = []
    monkeypatch.setattr("llmrec.hub.HfApi", FakeHfApi)
    files = push_to_hub(model_folder, "someone/llmrec-planted", private=True, token="hf_x")
    assert files == files_to_upload(model_folder)
    assert not [name for name in files if name.startswith("checkpoints")]
    assert [call[0] for call in FakeHfApi.calls] == ["create_repo", "upload_folder"]
    create, upload = FakeHfApi.calls
    assert create[2]["private"] is True and create[3] == "hf_x"
    assert upload[2]["folder_path"] == model_folder and upload[2]["allow_patterns"] == files


def test_dry_run_lists_files_without_network(model_folder, monkeypatch):
    monkeypatch.setattr("llmrec.hub.HfApi", None)  # any use of the Hub client would fail
    files = push_to_hub(model_folder, "someone/llmrec-planted", dry_run=True)
    assert files == files_to_upload(model_folder)
    completed = subprocess.run(
        [sys.executable, "scripts/push_to_hub.py", str(model_folder), "someone/llmrec-planted", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    listed = [line.strip() for line in completed.stdout.splitlines()[1:]]
    assert listed == files


def test_recommender_push_passes_its_options_to_the_folder_upload(recommender, monkeypatch):
    """`Recommender.push_to_hub` saves a folder, names the repo in its card, and hands the options on."""
    FakeHfApi.calls = []
    monkeypatch.setattr("llmrec.hub.HfApi", FakeHfApi)
    files = recommender.push_to_hub("someone/llmrec-card", private=False, token="hf_y", commit_message="first")
    assert "README.md" in files and "config.json" in files
    create, upload = FakeHfApi.calls
    assert create[2]["private"] is False and create[3] == "hf_y" and upload[2]["commit_message"] == "first"
    monkeypatch.setattr("llmrec.hub.HfApi", None)  # a dry run never builds the Hub client
    assert recommender.push_to_hub("someone/llmrec-card", dry_run=True) == files
    saves = []
    monkeypatch.setattr(type(recommender), "save_pretrained", lambda self, folder: saves.append(folder))
    with pytest.raises(TypeError, match="privat"):
        recommender.push_to_hub("someone/llmrec-card", privat=True)
    assert not saves, "a misspelled option must fail before the model is saved"


def test_push_refuses_a_broken_folder_and_reports_upload_failures(model_folder, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    (broken / "README.md").unlink()
    with pytest.raises(ModelFolderError, match="README.md"):
        push_to_hub(broken, "someone/x", dry_run=True)

    class OfflineApi(FakeHfApi):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr("llmrec.hub.HfApi", OfflineApi)
    with pytest.raises(HubUploadError, match="hf auth login"):
        push_to_hub(model_folder, "someone/x")
    completed = subprocess.run(
        [sys.executable, "scripts/push_to_hub.py", str(broken), "someone/x"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 2 and "README.md" in completed.stderr and "Traceback" not in completed.stderr


def test_uploaded_files_load_like_a_hub_snapshot(recommender, model_folder, tmp_path, monkeypatch):
    """Exactly the pushed files, laid out as `snapshot_download` returns them, give the same scores."""
    snapshot = tmp_path / "hub-cache" / "models--someone--llmrec-planted" / "snapshots" / "0123abcd"
    for name in files_to_upload(model_folder):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_folder / name, snapshot / name)
    requested = []

    def fake_snapshot_download(repo_id, revision=None, token=None, **kwargs):
        requested.append((repo_id, revision))
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    downloaded = Recommender.from_pretrained("someone/llmrec-planted", revision="main")
    assert requested == [("someone/llmrec-planted", "main")]
    assert_same_scores(scores_of(downloaded), scores_of(recommender))


def test_every_package_is_shipped():
    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "llmrec").rglob("__init__.py")
    }
    assert found <= packages, f"add {sorted(found - packages)} to [tool.setuptools] packages in pyproject.toml"
    assert (REPO / "model_cards" / "llmrec_model_card.md").is_file()


# ----- safe, explained loading failures ----------------------------------------------------------------


def _break_missing(folder: Path, name: str) -> None:
    (folder / name).unlink()


def _truncate(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _index_with(folder: Path, rows: int, dim: int) -> None:
    ItemIndex.build(np.random.default_rng(0).normal(size=(rows, dim)).astype("float32")).save(folder / "item_index.faiss")


BROKEN_FOLDERS = {
    "no config": (lambda f: _break_missing(f, "config.json"), "config.json"),
    "no weights": (lambda f: _break_missing(f, "model.safetensors"), "model.safetensors"),
    "no catalogue": (lambda f: _break_missing(f, "catalogue.parquet"), "catalogue.parquet"),
    "no index": (lambda f: _break_missing(f, "item_index.faiss"), "item_index.faiss"),
    "truncated weights": (lambda f: _truncate(f, "model.safetensors"), "model.safetensors"),
    "corrupt catalogue": (lambda f: (f / "catalogue.parquet").write_bytes(b"not parquet"), "catalogue.parquet"),
    "config not json": (lambda f: (f / "config.json").write_text("{"), "config.json"),
    "newer llmrec": (lambda f: _edit_config(f, format_version=99, llmrec_version="9.0.0"), "format_version 99.*9.0.0"),
    "not an llmrec model": (lambda f: _edit_config(f, model_type="bert"), "model_type 'bert'"),
    "adapter missing": (lambda f: _edit_config(f, encoder_weights="adapter"), "adapter_config.json"),
    "index of another dimension": (lambda f: _index_with(f, 80, 7), "7-dimensional"),
    "index of another catalogue": (lambda f: _index_with(f, 79, 32), "holds 79 items"),
    "no tokenizer": (lambda f: [_break_missing(f, n) for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt") if (f / n).exists()], "tokenizer"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_broken_folders_fail_with_the_file_named(case, model_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    breakage, message = BROKEN_FOLDERS[case]
    breakage(folder)
    with pytest.raises(ModelFolderError):  # the recorded checksums usually catch it first
        Recommender.from_pretrained(folder)
    with pytest.raises(ModelFolderError, match=message):  # and the structural check still does without them
        Recommender.from_pretrained(folder, verify=False)


# ----- crash safety of saving --------------------------------------------------------------------------

_SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    from llmrec import Recommender
    recommender = Recommender.from_pretrained(sys.argv[1])
    # The new version differs in two files (weights and catalogue), so a mix of old and new would show.
    recommender.item_texts = [text + " (resaved)" for text in recommender.item_texts]
    recommender.model.reranker.scorer[-1].bias.data += 1.0
    while True:
        print("saving", flush=True)
        recommender.save_pretrained(sys.argv[2])
    """
)


@pytest.mark.slow
def test_a_save_killed_at_any_moment_leaves_a_complete_folder(recommender, model_folder, tmp_path):
    target = tmp_path / "served"
    shutil.copytree(model_folder, target)
    old_scores = scores_of(recommender)
    new_scores = [[(item, score + 1.0) for item, score in ranked] for ranked in old_scores]
    new_scores[3] = old_scores[3]  # the empty history is scored by popularity, not by the head
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    interrupted = 0
    for delay in (0.0, 0.05, 0.15):
        process = subprocess.Popen(
            [sys.executable, "-c", _SAVE_FOREVER, str(model_folder), str(target)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3):  # let it finish a couple of saves, then kill it inside the next one
            assert process.stdout.readline().strip() == "saving"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        interrupted += bool([path for path in tmp_path.iterdir() if path.name.startswith(".served.")])
        loaded = Recommender.from_pretrained(target)  # the old folder or the new one, never a mix
        if loaded.item_texts == recommender.item_texts:
            assert_same_scores(scores_of(loaded), old_scores)
        else:
            assert all(text.endswith("(resaved)") for text in loaded.item_texts)
            assert_same_scores(scores_of(loaded), new_scores)
    assert interrupted, "no kill landed inside a save; the test checked nothing"


def test_save_refuses_a_file_or_the_working_directory(recommender, tmp_path, monkeypatch):
    (tmp_path / "model.txt").write_text("mine")
    with pytest.raises(ModelFolderError, match="is a file"):
        recommender.save_pretrained(tmp_path / "model.txt")
    assert (tmp_path / "model.txt").read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFolderError, match="working directory"):
        recommender.save_pretrained(".")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.txt"]


def test_a_folder_moved_aside_by_an_interrupted_save_is_restored(model_folder, tmp_path):
    target = tmp_path / "served"
    shutil.copytree(model_folder, target)
    os.replace(target, tmp_path / ".served.old-0123456789ab")  # killed between the two renames
    assert Recommender.from_pretrained(target).num_items == 80
    assert target.is_dir()


def test_the_model_card_names_the_index_the_folder_holds(tiny_encoder_dir, tmp_path):
    from llmrec.retrieval import build_item_index
    from tests.test_serving_safety import build_recommender

    flat = build_recommender(tiny_encoder_dir)
    assert "`IndexFlatIP`" in str(flat.model_card())
    hnsw = Recommender(
        flat.model, flat.tokenizer, list(flat.item_ids), list(flat.item_texts), flat.item_popularity,
        index=build_item_index(flat.model, "hnsw"),
    )
    card = str(hnsw.model_card())
    assert "`IndexHNSWFlat`" in card and "IndexFlatIP" not in card
    hnsw.save_pretrained(tmp_path / "model")
    assert "`IndexHNSWFlat`" in (tmp_path / "model" / "README.md").read_text()
