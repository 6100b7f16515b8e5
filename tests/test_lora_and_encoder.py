"""LoRA fine-tuning of the encoder (sampled softmax, adapter saved as an adapter) and the real bundled MiniLM."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

from conftest import tiny_overrides
from llmrec import Recommender
from llmrec.modeling import LlmRecModel
from llmrec.modeling.text_encoding import encode_catalogue, tokenize_item_texts
from llmrec.training.pipeline import default_encoder_path
from test_finetune import REPO, assert_run_outputs


@pytest.mark.slow
def test_lora_run_trains_adapters_and_saves_them(tmp_path, planted_data_dir, tiny_encoder_dir):
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "lora")
    overrides["training"].update({"retrieval_epochs": 2, "rerank_epochs": 1, "num_sampled_negatives": 16})
    overrides["lora"] = {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}
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

    # The adapter moved the encoder away from its base weights, and the merged model equals base + adapter.
    base = AutoModel.from_pretrained(tiny_encoder_dir)
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_encoder_dir), adapter_dir).merge_and_unload()
    merged = Recommender.from_pretrained(output_dir).model.item_encoder.backbone
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(base.state_dict()[name], adapted.state_dict()[name])
    torch.testing.assert_close(merged.state_dict()[name], adapted.state_dict()[name])


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
