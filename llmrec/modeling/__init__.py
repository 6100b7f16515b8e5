from .configuration_llmrec import MODEL_FORMAT_VERSION, LlmRecConfig
from .modeling_llmrec import IGNORE_INDEX, CrossAttentionReranker, LlmRecModel, LlmRecOutput, UserEncoder, pad_histories

__all__ = [
    "MODEL_FORMAT_VERSION",
    "IGNORE_INDEX",
    "CrossAttentionReranker",
    "LlmRecConfig",
    "LlmRecModel",
    "LlmRecOutput",
    "UserEncoder",
    "pad_histories",
]
