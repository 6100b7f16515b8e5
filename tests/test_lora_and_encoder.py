"""LoRA fine-tuning of the encoder (sampled softmax, adapter saved as an adapter) and the real bundled MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from conftest import tiny_overrides
from llmrec import Recommender
from llmrec.modeling import LlmRecModel
from llmrec.modeling.text_encoding import embed_item_texts, encode_catalogue, tokenize_item_texts
from llmrec.training.pipeline import default_encoder_path
from test_finetune import REPO, assert_run_outputs


@pytest.mark.slow
def test_lora_run_trains_adapters_and_saves_them(tmp_path, planted_data_dir, tiny_encoder_dir):
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "lora")
    overrides["training"].update({"retrieval_epochs": 2, "rerank_epochs": 1, "num_sampled_negatives": 16})
    overrides["lora"] = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(overrides))
    completed = subprocess.run(
        [sys.executable, "scripts/finetune.py", "--config", str(tmp_path / "lora.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "loss sampled_softmax" in completed.stderr
    output_dir = tmp_path / "lora"
    assert_run_outputs(output_dir)
    adapter_dir = output_dir / "encoder_adapter"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()

    # The folder stores the encoder as an adapter only: no base weights in model.safetensors.
    assert json.loads((output_dir / "config.json").read_text())["encoder_weights"] == "adapter"
    assert not [name for name in safe_open(output_dir / "model.safetensors", "pt").keys() if "backbone" in name]
    card = (output_dir / "README.md").read_text()
    assert "lora" in yaml.safe_load(card.split("---")[1])["tags"]

    # Loading gives base + adapter as a PeftModel, and the adapter moved the encoder away from its base.
    base = AutoModel.from_pretrained(tiny_encoder_dir)
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_encoder_dir), adapter_dir).merge_and_unload()
    recommender = Recommender.from_pretrained(output_dir)
    loaded = recommender.model.item_encoder.backbone
    assert isinstance(loaded, PeftModel)
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(base.state_dict()[name], adapted.state_dict()[name])
    torch.testing.assert_close(loaded.merge_and_unload().state_dict()[name], adapted.state_dict()[name])


@pytest.mark.slow
def test_lora_model_round_trips_as_an_adapter(tmp_path, tiny_encoder_dir):
    from llmrec.training.pipeline import add_lora
    from llmrec.config import load_config

    model = LlmRecModel.from_encoder(str(tiny_encoder_dir), num_items=4, hidden_size=16, user_num_heads=2, rerank_num_heads=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    texts = ["movie number 1 genre g0", "movie number 2 genre g1", "movie number 3 genre g2", "movie number 4 genre g3"]
    encode_catalogue(model, tokenize_item_texts(tokenizer, texts, 16), show_progress=False)
    config = load_config(overrides={"lora": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}})
    add_lora(model, config)
    with torch.no_grad():  # a trained adapter is not zero; make this one visibly move the encoder
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.5)
    recommender = Recommender(model, tokenizer, ["a", "b", "c", "d"], texts, [4.0, 3.0, 2.0, 1.0])
    recommender.save_pretrained(tmp_path / "first")
    reloaded = Recommender.from_pretrained(tmp_path / "first")
    reloaded.save_pretrained(tmp_path / "second")
    again = Recommender.from_pretrained(tmp_path / "second")
    assert isinstance(again.model.item_encoder.backbone, PeftModel)
    for other in (reloaded, again):
        expected, got = recommender.recommend(["a", "b"], k=2), other.recommend(["a", "b"], k=2)
        assert [item for item, _ in got] == [item for item, _ in expected]
        np.testing.assert_allclose([score for _, score in got], [score for _, score in expected], atol=1e-6)
        # The encoder itself (base + adapter) round-trips: new items embed identically.
        torch.testing.assert_close(
            embed_item_texts(other.model, other.tokenizer, ["movie number 9 genre g1"]),
            embed_item_texts(recommender.model, recommender.tokenizer, ["movie number 9 genre g1"]),
        )


def test_bundled_minilm_embeds_item_texts_meaningfully():
    encoder_path = default_encoder_path()
    model = LlmRecModel.from_encoder(encoder_path, num_items=3, hidden_size=16)
    assert model.item_encoder.output_size == 384
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    texts = [
        "Star Wars (1977). Genres: Action Adventure Sci-Fi",
        "Return of the Jedi (1983). Genres: Action Adventure Sci-Fi",
        "Sense and Sensibility (1995). Genres: Drama Romance",
    ]
    embeddings = encode_catalogue(model, tokenize_item_texts(tokenizer, texts, 64), show_progress=False)
    assert embeddings[0].abs().sum() == 0  # padding row
    normalized = torch.nn.functional.normalize(embeddings[1:], dim=-1)
    similarity = normalized @ normalized.T
    assert similarity[0, 1] > similarity[0, 2] + 0.1
