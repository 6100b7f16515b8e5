"""Typed experiment configuration.

One dataclass per YAML section (`data`, `model`, `lora`, `training`, `retrieval`, `evaluation`); the YAML file,
the command line and the run's saved `config.yaml` all map one-to-one onto these fields. Precedence (as in
RecBole): defaults < YAML file < command-line overrides written as ``--section.field value``.
"""

from ..errors import ConfigError
from .checks import MAX_SEED, check_seed
from .data import DataConfig
from .experiment import ExperimentConfig, resumable_settings
from .loading import load_config, parse_overrides, save_config
from .model import LoraSettings, ModelSettings
from .retrieval import EvaluationSettings, RetrievalSettings
from .training import TrainingSettings

__all__ = [
    "ConfigError", "DataConfig", "EvaluationSettings", "ExperimentConfig", "LoraSettings", "MAX_SEED", "ModelSettings",
    "RetrievalSettings", "TrainingSettings", "check_seed", "load_config", "parse_overrides", "resumable_settings",
    "save_config",
]
