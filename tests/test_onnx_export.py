"""ONNX export of the item encoder: the exported graph (fp32 and int8) encodes items like the PyTorch model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from llmrec.modeling import LlmRecModel, OnnxItemEncoder, export_item_encoder_onnx
from llmrec.modeling.precision import quantize_int8
from llmrec.modeling.text_encoding import embed_item_texts

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TEXTS = ["movie number 1 genre g0", "movie 2 genre g1 and a longer title here", "movie number 3", "g3"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_encoder_dir):
    torch.manual_seed(0)
    model = LlmRecModel.from_encoder(str(tiny_encoder_dir), num_items=4, hidden_size=16, user_num_heads=2, rerank_num_heads=2)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_encoder_dir)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_exported_encoder_matches_pytorch_for_any_batch_and_length(model_and_tokenizer, tmp_path, quantize):
    model, tokenizer = model_and_tokenizer
    path = export_item_encoder_onnx(model, tmp_path / "encoder.onnx", quantize=quantize)
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p != path]  # one file, no temporaries left
    onnx_encoder = OnnxItemEncoder(path)
    assert onnx_encoder.output_size == model.item_encoder.output_size
    # Batch size and sequence length differ from the export's example input (2 x 4): the axes are dynamic.
    expected = embed_item_texts(model, tokenizer, TEXTS, batch_size=3)
    got = embed_item_texts(model, tokenizer, TEXTS, batch_size=3, item_encoder=onnx_encoder)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if quantize is None:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:
        assert not torch.allclose(got, expected, atol=1e-6)  # the weights really are int8
        assert torch.nn.functional.cosine_similarity(got, expected, dim=-1).min() > 0.9


def test_export_replaces_an_old_file_only_when_complete(model_and_tokenizer, tmp_path, monkeypatch):
    model, _ = model_and_tokenizer
    path = tmp_path / "encoder.onnx"
    path.write_bytes(b"an earlier export")

    def failing_export(*args, **kwargs):
        raise RuntimeError("export interrupted")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(RuntimeError, match="export interrupted"):
        export_item_encoder_onnx(model, path)
    assert path.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx"]


def test_bad_export_requests_are_clear_errors(model_and_tokenizer, tmp_path):
    model, _ = model_and_tokenizer
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        export_item_encoder_onnx(model, tmp_path / "encoder.onnx", quantize="int4")
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_item_encoder_onnx(model, tmp_path / "encoder.bin")
    with pytest.raises(FileNotFoundError, match="export_item_encoder_onnx"):
        OnnxItemEncoder(tmp_path / "missing.onnx")
    quantized = LlmRecModel(model.config)
    quantize_int8(quantized.item_encoder)
    with pytest.raises(ValueError, match="int8-quantised by PyTorch"):
        export_item_encoder_onnx(quantized, tmp_path / "encoder.onnx")


def test_lora_encoder_is_exported_with_its_adapter_merged(model_and_tokenizer, tmp_path):
    from llmrec.config import load_config
    from llmrec.training.pipeline import add_lora

    model, tokenizer = model_and_tokenizer
    adapted = LlmRecModel(model.config)
    adapted.load_state_dict(model.state_dict())
    add_lora(adapted, load_config(overrides={"lora": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}}))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    adapted.eval()
    expected = embed_item_texts(adapted, tokenizer, TEXTS)
    assert not torch.allclose(expected, embed_item_texts(model, tokenizer, TEXTS), atol=1e-3)  # the adapter matters
    onnx_encoder = OnnxItemEncoder(export_item_encoder_onnx(adapted, tmp_path / "encoder.onnx"))
    torch.testing.assert_close(embed_item_texts(adapted, tokenizer, TEXTS, item_encoder=onnx_encoder), expected, atol=1e-4, rtol=1e-4)
