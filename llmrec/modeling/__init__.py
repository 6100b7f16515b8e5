from transformers import AutoConfig, AutoModel

from .configuration_llmrec import MAX_NUM_CANDIDATES, MODEL_FORMAT_VERSION, LlmRecConfig
from .modeling_llmrec import (
    IGNORE_INDEX,
    CrossAttentionReranker,
    LlmRecModel,
    LlmRecOutput,
    RerankCache,
    UserEncoder,
    pad_histories,
    split_histories,
)
from .task_models import LlmRecForReranking, LlmRecForRetrieval
from .onnx_export import OnnxItemEncoder, export_item_encoder_onnx

# Registered so Auto classes (AutoTokenizer reading config.json, AutoModel) know the "llmrec" model type.
AutoConfig.register("llmrec", LlmRecConfig, exist_ok=True)
AutoModel.register(LlmRecConfig, LlmRecModel, exist_ok=True)

__all__ = [
    "MAX_NUM_CANDIDATES",
    "MODEL_FORMAT_VERSION",
    "IGNORE_INDEX",
    "CrossAttentionReranker",
    "LlmRecConfig",
    "LlmRecForReranking",
    "LlmRecForRetrieval",
    "LlmRecModel",
    "LlmRecOutput",
    "OnnxItemEncoder",
    "RerankCache",
    "UserEncoder",
    "export_item_encoder_onnx",
    "pad_histories",
    "split_histories",
]
