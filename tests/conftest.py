"""Shared fixtures: a tiny random BERT and a synthetic catalogue with planted preferences, built once."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

NUM_GENRES = 4
ITEMS_PER_GENRE = 20
NUM_USERS = 80
HISTORY_LENGTH = 12


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 1-layer random BERT with a word-level vocabulary covering the synthetic item texts."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = ["genre", "movie", "about", "number"] + [f"g{genre}" for genre in range(NUM_GENRES)] + [str(n) for n in range(100)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    # From a dict: transformers 5's BertTokenizerFast ignores `vocab_file` and would map every word to [UNK].
    tokenizer = BertTokenizerFast(vocab={word: index for index, word in enumerate(vocab)})
    assert tokenizer("movie genre g1")["input_ids"] == [2, vocab.index("movie"), vocab.index("genre"), vocab.index("g1"), 3]
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def write_planted_data(folder: Path, seed: int = 0) -> Path:
    """Users follow their favourite genre through its items in a fixed order; popularity alone cannot.

    Every user starts at a random point of their genre's cycle, so item popularity is nearly flat while
    the next item is predictable from the history (and from the text, which names the genre).
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "title", "genre"])
        for genre in range(NUM_GENRES):
            for position in range(ITEMS_PER_GENRE):
                writer.writerow([f"i{genre * ITEMS_PER_GENRE + position}", f"movie number {position}", f"g{genre}"])
    with open(folder / "interactions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for user in range(NUM_USERS):
            genre = user % NUM_GENRES
            start = rng.randrange(ITEMS_PER_GENRE)
            for step in range(HISTORY_LENGTH):
                position = (start + step) % ITEMS_PER_GENRE
                writer.writerow([f"u{user}", f"i{genre * ITEMS_PER_GENRE + position}", 1000 * user + step])
    return folder


@pytest.fixture(scope="session")
def planted_data_dir(tmp_path_factory) -> Path:
    return write_planted_data(tmp_path_factory.mktemp("planted"))


def tiny_overrides(data_dir: Path, encoder_dir: Path, output_dir: Path) -> dict:
    """Config overrides for a seconds-long run on the planted data with the tiny encoder."""
    return {
        "output_dir": str(output_dir),
        "data": {
            "format": "csv",
            "path": str(data_dir),
            "interactions_file": "interactions.csv",
            "items_file": "items.csv",
            "rating_column": None,
            "item_text_template": "{title} genre {genre}",
        },
        "model": {
            "encoder": str(encoder_dir), "hidden_size": 32, "max_history_length": 16, "max_text_length": 16,
            "dropout": 0.1, "user_num_heads": 2, "rerank_num_heads": 2,
        },
        "training": {
            "retrieval_epochs": 25, "rerank_epochs": 5, "retrieval_batch_size": 16, "rerank_batch_size": 16,
            "retrieval_learning_rate": 0.005, "rerank_learning_rate": 0.003, "early_stopping_patience": 0,
            "rerank_positions_per_user": 4,
        },
        "retrieval": {"num_candidates": 20},
    }


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, planted_data_dir, tiny_encoder_dir) -> tuple[Path, dict]:
    """One in-process fine-tune on the planted data; its output folder and results feed several tests."""
    from llmrec.config import load_config
    from llmrec.training import run_finetune

    output_dir = tmp_path_factory.mktemp("run")
    config = load_config(overrides=tiny_overrides(planted_data_dir, tiny_encoder_dir, output_dir))
    results = run_finetune(config)
    return output_dir, results
