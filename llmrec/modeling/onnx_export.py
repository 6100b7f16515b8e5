"""ONNX export of the item text encoder, for encoding catalogues with ONNX Runtime on CPU.

Measured here (`bench/attention.py`, MovieLens-100k item texts, one thread): ONNX Runtime in fp32 is no
faster than PyTorch, but its dynamic int8 quantisation is both faster (~2.4x fp32) and much closer to fp32
than PyTorch's (`quantize_int8`: cosine ~0.99 against ~0.97), so int8 through ONNX Runtime is the one to use
on CPUs without bf16 instructions. The graph holds BERT and the pooling, so it maps (input_ids,
attention_mask) straight to the vectors the model caches. Needs the `onnx` extra:
`pip install "llmrec[onnx]"` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..utils.io import atomic_write
from .modeling_llmrec import ItemTextEncoder, LlmRecModel

logger = logging.getLogger(__name__)

ONNX_QUANTIZATIONS = ("int8",)
_INSTALL_HINT = 'ONNX export needs the onnx extra: pip install "llmrec[onnx]" (onnx, onnxscript, onnxruntime).'


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{_INSTALL_HINT} ({error})") from error


def _exportable_encoder(encoder: ItemTextEncoder) -> ItemTextEncoder:
    """An fp32 copy with any LoRA adapter merged in; refuses encoders already quantised by PyTorch."""
    if any(type(module).__module__.startswith("torch.ao.nn.quantized") for module in encoder.modules()):
        raise ValueError("This encoder is int8-quantised by PyTorch and cannot be exported; export the fp32 model "
                         "(Recommender.from_pretrained without quantize=) and pass quantize='int8' here instead.")
    exportable = copy.deepcopy(encoder).float().eval()
    if hasattr(exportable.backbone, "merge_and_unload"):  # a PEFT (LoRA) backbone: one plain BERT to export
        exportable.backbone = exportable.backbone.merge_and_unload()
    return exportable


def export_item_encoder_onnx(
    model: LlmRecModel,
    path: str | os.PathLike,
    quantize: Optional[str] = None,
    opset_version: int = 18,
) -> Path:
    """Write the item encoder (BERT + pooling) to one `.onnx` file, optionally with dynamic int8 weights.

    Batch size and sequence length stay dynamic. The file appears only when complete (an interrupted export
    leaves any earlier file in place). Returns the path.
    """
    if quantize is not None and quantize not in ONNX_QUANTIZATIONS:
        raise ValueError(f"quantize must be None or one of {ONNX_QUANTIZATIONS}, got {quantize!r}.")
    _require("onnx")
    _require("onnxscript")
    target = Path(path)
    if target.suffix != ".onnx":
        raise ValueError(f"The ONNX file name must end in .onnx; got {str(target)!r}.")
    encoder = _exportable_encoder(model.item_encoder)
    # Any ids inside the vocabulary trace the graph; the second row is padded so the mask is exercised.
    example_ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 0]]).clamp(max=encoder.backbone.config.vocab_size - 1)
    example_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # The scratch folder sits beside the target, so moving the export into place never crosses filesystems.
    with atomic_write(target) as temporary, tempfile.TemporaryDirectory(dir=target.parent, prefix=".onnx-export-") as scratch:
        exported = Path(scratch) / "encoder.onnx"
        torch.onnx.export(
            encoder, (example_ids, example_mask), str(exported),
            input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            opset_version=opset_version, dynamo=True, external_data=False, optimize=True, verbose=False,
        )
        if quantize == "int8":
            quantization = _require("onnxruntime.quantization")
            quantization.quantize_dynamic(str(exported), str(temporary), weight_type=quantization.QuantType.QInt8, per_channel=True)
        else:
            os.replace(exported, temporary)
    logger.info("Exported the item encoder to %s%s.", target, " (int8 weights)" if quantize else "")
    return target


class OnnxItemEncoder(nn.Module):
    """An exported item encoder run by ONNX Runtime, called like `LlmRecModel.encode_item_texts`.

    Pass it as `item_encoder=` to `embed_tokenized_items` / `embed_item_texts` to encode a catalogue with it.
    `num_threads` defaults to PyTorch's intra-op thread count, so both compete for the same cores alike.
    """

    def __init__(self, path: str | os.PathLike, num_threads: Optional[int] = None) -> None:
        super().__init__()
        onnxruntime = _require("onnxruntime")
        if not Path(path).is_file():
            raise FileNotFoundError(f"No ONNX encoder at {path}; write one with export_item_encoder_onnx(model, path).")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        width = self.session.get_outputs()[0].shape[-1]
        self.output_size = width if isinstance(width, int) else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        (embeddings,) = self.session.run(
            None, {"input_ids": input_ids.cpu().long().numpy(), "attention_mask": attention_mask.cpu().long().numpy()}
        )
        return torch.from_numpy(embeddings).to(input_ids.device)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, output_size={self.output_size}"
