"""llmrec: a BERT encoder reads items and histories, FAISS retrieves, cross-attention reranks."""

from .config import ExperimentConfig, load_config
from .errors import ConfigError, DataError, LlmRecError, ModelFolderError, UnknownItemError
from .modeling import LlmRecConfig, LlmRecModel
from .recommender import Recommender

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "ExperimentConfig",
    "LlmRecConfig",
    "LlmRecError",
    "LlmRecModel",
    "ModelFolderError",
    "Recommender",
    "UnknownItemError",
    "load_config",
]
