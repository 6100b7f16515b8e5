"""llmrec: a BERT encoder reads items and histories, FAISS retrieves, cross-attention reranks.

Heavy submodules (torch, transformers) load on first use, as in transformers itself, so that
`import llmrec.data` or `llmrec.config` stays fast.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .config import ExperimentConfig, load_config
from .errors import ConfigError, DataError, LlmRecError, ModelFolderError, UnknownItemError
from .version import __version__

_LAZY_ATTRIBUTES = {
    "LlmRecConfig": ".modeling",
    "LlmRecForReranking": ".modeling",
    "LlmRecForRetrieval": ".modeling",
    "LlmRecModel": ".modeling",
    "Recommender": ".recommender",
}

if TYPE_CHECKING:
    from .modeling import LlmRecConfig, LlmRecForReranking, LlmRecForRetrieval, LlmRecModel
    from .recommender import Recommender


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        return getattr(import_module(_LAZY_ATTRIBUTES[name], __name__), name)
    raise AttributeError(f"module 'llmrec' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DataError",
    "ExperimentConfig",
    "LlmRecConfig",
    "LlmRecError",
    "LlmRecForReranking",
    "LlmRecForRetrieval",
    "LlmRecModel",
    "ModelFolderError",
    "Recommender",
    "UnknownItemError",
    "load_config",
]
