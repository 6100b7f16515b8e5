"""One save/load round trip for every model variant, from a folder and from a (fake) Hub snapshot.

Each variant is built untrained but with every learned part moved off its initial value (a zero-initialised
reranker head or LoRA B matrix would hide a part that failed to load), saved, loaded again and compared:
same config, same index, same recommendations and scores to 1e-6, and the same encoder for new texts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer

from llmrec import Recommender
from llmrec.hub import files_to_upload
from llmrec.modeling import LlmRecModel
from llmrec.modeling.text_encoding import embed_item_texts, encode_catalogue, tokenize_item_texts
from llmrec.retrieval import build_item_index
from test_hub import assert_same_scores

NUM_ITEMS = 80  # enough for a two-list IVF index
HISTORIES = [["i0", "i1", "i2"], ["i41", "i42"], ["i77"], []]
CANDIDATES = [["i3", "i43", "i60", "i5"]] * 3
PROFILES = ["likes genre g1 movies", None, "movie number 7", "genre g3"]
NEW_TEXT = ["movie number 99 genre g2"]

VARIANTS = {
    "hybrid": {},
    "text_only": {"model": {"use_id_embeddings": False}},
    "id_only": {"model": {"use_text_embeddings": False}},
    "lora": {"lora": True},
    "profiles": {"model": {"use_user_profiles": True}},
    "hnsw": {"index": ("hnsw", {"M": 8})},
    "ivf": {"index": ("ivf", {"nlist": 2, "nprobe": 1})},
}


def build_variant(encoder_dir: Path, variant: str) -> Recommender:
    """A tiny recommender of one variant whose learned parameters are all non-trivial."""
    spec = VARIANTS[variant]
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    model = LlmRecModel.from_encoder(
        str(encoder_dir), num_items=NUM_ITEMS, num_candidates=10, hidden_size=16, max_history_length=8,
        max_text_length=16, user_num_heads=2, rerank_num_heads=2, dropout=0.0, **spec.get("model", {}),
    )
    if spec.get("lora"):
        peft_config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
        model.item_encoder.backbone = get_peft_model(model.item_encoder.backbone, peft_config)
    with torch.no_grad():  # move zero-initialised parts (reranker output, LoRA B) so a lost one shows
        for name, parameter in model.named_parameters():
            if "reranker.scorer" in name or "lora_B" in name:
                parameter.normal_(std=0.5)
    texts = [f"movie number {n % 20} genre g{n // 20}" for n in range(NUM_ITEMS)]
    encode_catalogue(model, tokenize_item_texts(tokenizer, texts, 16), show_progress=False)
    model.warm_items[1:] = True
    model.eval()
    index = None
    if "index" in spec:
        index_type, params = spec["index"]
        index = build_item_index(model, index_type, **params)
    popularity = np.arange(NUM_ITEMS, 0, -1, dtype=float)
    return Recommender(model, tokenizer, [f"i{n}" for n in range(NUM_ITEMS)], texts, popularity, index=index)


def outputs_of(recommender: Recommender) -> list:
    """Everything a user can ask for: top-k, reranked candidates and, for a profile model, profile-led lists."""
    ranked = recommender.recommend_batch(HISTORIES, k=10) + recommender.rerank_batch(HISTORIES[:3], CANDIDATES)
    if recommender.model.config.use_user_profiles:
        ranked += recommender.recommend_batch(HISTORIES, k=10, profiles=PROFILES)
    return ranked


def comparable_config(recommender: Recommender) -> dict:
    """The model config as JSON stores it (integer label keys become strings), without where it was read from."""
    config = json.loads(recommender.model.config.to_json_string(use_diff=False))
    for name in ("_name_or_path", "file_checksums"):
        config.pop(name, None)
    return config


def assert_same_recommender(expected: Recommender, got: Recommender) -> None:
    assert comparable_config(got) == comparable_config(expected)
    got_index, expected_index = got.pipeline.index, expected.pipeline.index
    assert (got_index.index_type, got_index.params) == (expected_index.index_type, expected_index.params)
    assert type(got_index.faiss_index) is type(expected_index.faiss_index)
    assert list(got.item_ids) == list(expected.item_ids) and list(got.item_texts) == list(expected.item_texts)
    np.testing.assert_array_equal(got.item_popularity, expected.item_popularity)
    assert isinstance(got.model.item_encoder.backbone, PeftModel) == isinstance(expected.model.item_encoder.backbone, PeftModel)
    torch.testing.assert_close(
        embed_item_texts(got.model, got.tokenizer, NEW_TEXT), embed_item_texts(expected.model, expected.tokenizer, NEW_TEXT),
        rtol=0, atol=1e-6,
    )
    assert_same_scores(outputs_of(expected), outputs_of(got))


def as_hub_snapshot(folder: Path, cache: Path, monkeypatch, repo_id: str = "someone/llmrec-model") -> list:
    """Serve the files a push would upload from a fake `snapshot_download` (no network); returns its calls."""
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
    for name in files_to_upload(folder):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / name, snapshot / name)
    calls = []

    def fake_snapshot_download(requested, revision=None, token=None, **kwargs):
        calls.append((requested, revision))
        assert requested == repo_id
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # any other download fails at once
    return calls


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_round_trips(variant, tiny_encoder_dir, tmp_path):
    original = build_variant(tiny_encoder_dir, variant)
    original.save_pretrained(tmp_path / "first")
    reloaded = Recommender.from_pretrained(tmp_path / "first")
    assert_same_recommender(original, reloaded)
    reloaded.save_pretrained(tmp_path / "second")  # a loaded model saves to the same thing again
    assert_same_recommender(original, Recommender.from_pretrained(tmp_path / "second"))


@pytest.mark.parametrize("variant", ["hybrid", "lora"])
def test_a_hub_repo_id_loads_like_the_folder(variant, tiny_encoder_dir, tmp_path, monkeypatch):
    original = build_variant(tiny_encoder_dir, variant)
    original.save_pretrained(tmp_path / "model")
    calls = as_hub_snapshot(tmp_path / "model", tmp_path / "hub-cache", monkeypatch)
    downloaded = Recommender.from_pretrained("someone/llmrec-model", revision="main")
    assert calls == [("someone/llmrec-model", "main")]
    assert_same_recommender(Recommender.from_pretrained(tmp_path / "model"), downloaded)


def test_a_lora_model_loaded_by_hub_repo_id_has_the_trained_encoder(tiny_encoder_dir, tmp_path, monkeypatch):
    """Issue 17, defect 1: the adapter was applied for a local folder only; a repo id got a random encoder."""
    original = build_variant(tiny_encoder_dir, "lora")
    original.save_pretrained(tmp_path / "model")
    calls = as_hub_snapshot(tmp_path / "model", tmp_path / "hub-cache", monkeypatch)
    local = LlmRecModel.from_pretrained(tmp_path / "model")
    by_repo_id = LlmRecModel.from_pretrained("someone/llmrec-model", revision="main")
    assert calls == [("someone/llmrec-model", "main")]
    assert isinstance(by_repo_id.item_encoder.backbone, PeftModel)
    tokenizer = original.tokenizer
    torch.testing.assert_close(
        embed_item_texts(by_repo_id, tokenizer, NEW_TEXT), embed_item_texts(local, tokenizer, NEW_TEXT), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(by_repo_id.state_dict(), local.state_dict(), rtol=0, atol=1e-6)
    served = Recommender(by_repo_id, tokenizer, list(original.item_ids), list(original.item_texts), original.item_popularity)
    assert_same_scores(outputs_of(original), outputs_of(served))


# ----- loading and saving are quiet ------------------------------------------------------------------


def library_bar_settings() -> tuple:
    import datasets
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    return transformers_logging.is_progress_bar_enabled(), datasets.are_progress_bars_disabled(), hub_utils.are_progress_bars_disabled()


def test_saving_and_loading_print_nothing_and_keep_the_users_settings(tiny_encoder_dir, tmp_path, capfd):
    import datasets

    recommender = build_variant(tiny_encoder_dir, "lora")
    capfd.readouterr()
    before = library_bar_settings()
    recommender.save_pretrained(tmp_path / "model")
    Recommender.from_pretrained(tmp_path / "model")
    LlmRecModel.from_pretrained(tmp_path / "model").save_pretrained(tmp_path / "weights")
    assert capfd.readouterr() == ("", "")
    assert library_bar_settings() == before
    datasets.disable_progress_bars()  # a user's own choice survives a load
    try:
        Recommender.from_pretrained(tmp_path / "model")
        assert library_bar_settings() == (before[0], True, before[2])
    finally:
        datasets.enable_progress_bars()
    assert capfd.readouterr() == ("", "")


def test_a_script_that_loads_and_saves_prints_nothing(tiny_encoder_dir, tmp_path):
    """Outside pytest's log capture too: no bars, and no warnings reaching logging's last-resort handler."""
    build_variant(tiny_encoder_dir, "hybrid").save_pretrained(tmp_path / "model")
    script = (
        "import sys; from llmrec import Recommender; "
        "r = Recommender.from_pretrained(sys.argv[1]); r.save_pretrained(sys.argv[2]); r.recommend(['i1'], k=3)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model"), str(tmp_path / "again")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )
    assert completed.returncode == 0, completed.stderr
    assert (completed.stdout, completed.stderr) == ("", "")


def test_one_rule_tells_a_hub_repo_id_from_a_path(tmp_path, monkeypatch):
    from llmrec.utils.snapshots import is_hub_repo_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "model").mkdir(parents=True)
    assert is_hub_repo_id("someone/llmrec-model") and is_hub_repo_id(Path("someone/llmrec-model"))
    for path_like in ("runs/model", "./someone/x", "/abs/x", "~/x", "model", "a/b/c", "unknown"):
        assert not is_hub_repo_id(path_like), path_like
