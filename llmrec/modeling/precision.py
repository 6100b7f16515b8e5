"""Reduced precision for inference: bf16 autocast (GPU, and CPUs with bf16 instructions) and int8 on CPU.

Both trade a little accuracy for speed, mostly in the BERT encoder where serving and catalogue encoding
spend their time; `bench/speed.py` measures the speed-up, the cosine to fp32 and the NDCG@10 change.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import ContextManager, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
QUANTIZATIONS = ("int8",)


def cpu_has_bf16() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX512-BF16 / AMX); elsewhere bf16 on CPU is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    return precision


def autocast(device: torch.device, precision: str = "fp32") -> ContextManager:
    """`torch.autocast` to bf16 on `device` for precision "bf16"; a no-op for "fp32".

    Matmuls and linear layers run in bf16 while softmax, layer norm and the pooling sums stay in fp32,
    which is what keeps pooled embeddings within ~1e-5 cosine of fp32.
    """
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu" and not cpu_has_bf16():
        logger.warning("This CPU has no native bf16 instructions; bf16 autocast will likely be slower than fp32.")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cast_encoder_bf16(module: nn.Module) -> nn.Module:
    """Keep the weights of `module` (the text encoder, for serving) in bf16.

    Faster than autocast for inference: autocast re-casts every frozen weight at every call (its cast
    cache only holds tensors that require grad), which on CPU ate the whole gain on short item texts
    (bench/README.md). Pooling stays fp32 (`ItemTextEncoder`).
    """
    return module.to(torch.bfloat16)


def quantize_int8(module: nn.Module, per_channel: bool = True) -> nn.Module:
    """Dynamic int8 quantisation of every `nn.Linear` in `module` (weights int8, activations quantised per batch).

    CPU only. Per-channel weight scales keep pooled MiniLM embeddings much closer to fp32 than one scale
    per tensor (cosine ~0.98 vs ~0.95 measured here) at about the same speed. Uses
    `torch.ao.quantization.quantize_dynamic`, deprecated in favour of torchao but present in torch 2.13.
    """
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(torch\.ao\.quantization|quantize_per).*deprecated")
        return quantize_dynamic(module, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)


def check_quantize(quantize: Optional[str], device: torch.device) -> Optional[str]:
    if quantize is None:
        return None
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got {quantize!r}.")
    if device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} is for CPU serving; on {device.type} use precision='bf16' instead.")
    return quantize
