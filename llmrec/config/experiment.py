"""The whole experiment: one field per YAML section."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError
from .checks import check_seed, unwrap_optional
from .data import DataConfig
from .fields import RESUMABLE, setting
from .model import LoraSettings, ModelSettings
from .retrieval import EvaluationSettings, RetrievalSettings
from .training import TrainingSettings


@dataclass
class ExperimentConfig:
    output_dir: str = setting(
        "runs/llmrec", "Folder of the run: checkpoints, the trained model, eval_results.json.", resumable=True,
    )
    data: DataConfig = setting(default_factory=DataConfig, help="What to read and how to split it.")
    model: ModelSettings = setting(default_factory=ModelSettings, help="Towers and reranking head.")
    lora: Optional[LoraSettings] = setting(
        None, "Set to fine-tune the encoder with PEFT LoRA; absent = frozen encoder.",
    )
    training: TrainingSettings = setting(
        default_factory=TrainingSettings, help="Both training stages and the profile fit.",
    )
    retrieval: RetrievalSettings = setting(
        default_factory=RetrievalSettings, help="FAISS candidates and the index that finds them.",
    )
    evaluation: EvaluationSettings = setting(
        default_factory=EvaluationSettings, help="Metrics on the valid and test users.",
    )

    def validate(self) -> "ExperimentConfig":
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty; give the folder the model, index and eval_results.json go to.")
        check_seed("data.seed", self.data.seed)  # here, not in DataConfig.validate: one check for every seed
        for section in (self.data, self.model, self.lora, self.training, self.retrieval, self.evaluation):
            if section is not None:
                section.validate()
        if max(self.evaluation.ks) > self.retrieval.num_candidates:
            raise ConfigError(
                f"evaluation.ks {self.evaluation.ks} go beyond retrieval.num_candidates "
                f"({self.retrieval.num_candidates}); raise num_candidates or lower the cut-offs."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resumable_settings(cls: type = ExperimentConfig, prefix: str = "") -> frozenset[str]:
    """Dotted names of the settings a resumed run may change (fields with `"resumable": True` metadata).

    They leave the data, the model and the optimisation untouched; thread counts and inference batch sizes can
    still move results at float-rounding level.
    """
    names: set[str] = set()
    annotations = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        section, _ = unwrap_optional(annotations[spec.name])
        if dataclasses.is_dataclass(section):
            names |= resumable_settings(section, f"{prefix}{spec.name}.")
        elif spec.metadata.get(RESUMABLE, False):
            names.add(prefix + spec.name)
    return frozenset(names)

