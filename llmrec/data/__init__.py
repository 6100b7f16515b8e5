"""Data loading (any supported layout -> canonical tables) and sequential train/valid/test splits."""

from .loaders import InteractionData, load_interaction_data
from .splits import EvaluationExamples, SequentialSplit, build_split

__all__ = ["InteractionData", "load_interaction_data", "EvaluationExamples", "SequentialSplit", "build_split"]
