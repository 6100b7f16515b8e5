"""A saved model's card (`README.md`): the facts of its run, gathered once, rendered through the template.

As in sentence-transformers (`SentenceTransformerModelCardData`), one dataclass holds what the card says about
a model (config, catalogue, evaluation, training config), and short functions turn it into the Hub's metadata
header and the values `model_cards/llmrec_model_card.md` fills in; `huggingface_hub.ModelCard` renders both,
so the header (library, tags, datasets, base model, `model-index` metrics) is the Hub's own format.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .modeling import LlmRecConfig
from .modeling.modeling_llmrec import ENCODER_ADAPTER_FOLDER
from .utils.snapshots import is_hub_repo_id
from .version import __version__

MODEL_CARD_TEMPLATE = "llmrec_model_card.md"
_SYSTEM_NAMES = {"popularity": "Popularity", "retrieval": "llmrec retrieval", "rerank": "llmrec retrieval + rerank"}
_METRIC_NAMES = {"ndcg": "NDCG", "hr": "HR", "mrr": "MRR"}
_EVALUATED_SPLITS = ("test", "cold_test", "cold_test_with_profile", "cold_test_profile_only", "valid")
_TAGS = ("llmrec", "recommendation", "sequential-recommendation", "faiss", "cross-attention")


@dataclass
class ModelCardFacts:
    """What a model card states about one model, with the names derived from them (dataset, base model, title)."""

    config: LlmRecConfig
    item_ids: Sequence[str]
    eval_results: dict[str, Any] = field(default_factory=dict)
    training_config: dict[str, Any] = field(default_factory=dict)
    repo_id: Optional[str] = None
    index_type: str = "IndexFlatIP"

    @property
    def base_model(self) -> str:
        return self.config.encoder_name_or_path or "unknown"

    @property
    def dataset_identity(self) -> tuple[str, str]:
        """(Hub-style id, readable name) of the training data, from the run's `data` section."""
        data = self.training_config.get("data", {})
        if not data.get("path"):
            return "movielens-100k", "MovieLens-100k"
        name = Path(str(data["path"])).expanduser().name or str(data["path"])
        return name.lower().replace(" ", "-"), name

    @property
    def model_name(self) -> str:
        return self.repo_id.split("/")[-1] if self.repo_id else f"llmrec-{self.dataset_identity[0]}"

    @property
    def uses_adapter(self) -> bool:
        return self.config.encoder_weights == "adapter"


def model_card_template_path() -> Path:
    """The repository's `model_cards/` template; wheels ship that folder as `llmrec.model_cards`."""
    in_checkout = Path(__file__).resolve().parents[1] / "model_cards" / MODEL_CARD_TEMPLATE
    if in_checkout.is_file():  # a source checkout or an editable install
        return in_checkout
    return Path(str(importlib.resources.files("llmrec.model_cards") / MODEL_CARD_TEMPLATE))


def render_model_card(
    config: LlmRecConfig,
    item_ids: Sequence[str],
    eval_results: Optional[dict[str, Any]] = None,
    training_config: Optional[dict[str, Any]] = None,
    repo_id: Optional[str] = None,
    index_type: str = "IndexFlatIP",
) -> ModelCard:
    """A model card with the run's real numbers: metadata header for the Hub, then usage, data, metrics, limits."""
    facts = ModelCardFacts(config, item_ids, eval_results or {}, training_config or {}, repo_id, index_type)
    return ModelCard.from_template(card_metadata(facts), template_path=str(model_card_template_path()), **template_values(facts))


# ----- the metadata header ---------------------------------------------------------------------------------


def card_metadata(facts: ModelCardFacts) -> ModelCardData:
    """The YAML header the Hub reads: library, tags, dataset, base model and the test metrics as `model-index`."""
    base_model = facts.base_model
    tags = list(_TAGS) + (["peft", "lora"] if facts.uses_adapter else [])
    return ModelCardData(
        library_name="llmrec",
        tags=tags,
        datasets=[facts.dataset_identity[0]],
        base_model=base_model if is_hub_repo_id(base_model) else None,
        model_name=facts.model_name,
        eval_results=_test_evaluations(facts) or None,
    )


def _test_evaluations(facts: ModelCardFacts) -> list[EvalResult]:
    """The head-line figures: the test metrics of retrieval + rerank."""
    dataset_id, dataset_name = facts.dataset_identity
    return [
        EvalResult(
            task_type="recommendation",
            task_name="Sequential recommendation",
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_split="test",
            metric_type=metric.replace("@", "_at_"),
            metric_name=_metric_label(metric),
            metric_value=round(float(value), 6),
        )
        for metric, value in _ranking_metrics(facts.eval_results.get("test", {}).get("rerank", {})).items()
    ]


def _ranking_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The accuracy metrics (HR/NDCG/MRR@k) of an evaluation: no bookkeeping such as num_users, and no diversity
    metrics (coverage@k...), which eval_results.json keeps but the Hub's model-index is not the place for."""
    return {name: value for name, value in metrics.items() if name.partition("@")[0] in _METRIC_NAMES and "@" in name}


def _metric_label(metric: str) -> str:
    """'ndcg@10' -> 'NDCG@10'."""
    name, _, k = metric.partition("@")
    return f"{_METRIC_NAMES.get(name, name.upper())}@{k}" if k else _METRIC_NAMES.get(name, name)


# ----- the body: values for the template ---------------------------------------------------------------------


def template_values(facts: ModelCardFacts) -> dict[str, Any]:
    """Every value `model_cards/llmrec_model_card.md` fills in."""
    config, item_ids, training_config = facts.config, facts.item_ids, facts.training_config
    example_history = [str(item_id) for item_id in item_ids[:3]]
    encoder_note, encoder_weights = _encoder_description(facts)
    return dict(
        model_name=facts.model_name,
        repo_id=facts.repo_id or "path/to/this/folder",
        base_model=facts.base_model,
        num_items=len(item_ids),
        example_history=example_history,
        example_history_cli=" ".join(example_history),
        example_candidates=[str(item_id) for item_id in item_ids[3:6]],
        example_item=repr(str(item_ids[-1])) if len(item_ids) else "''",
        encoder_note=encoder_note,
        encoder_weights=encoder_weights,
        pooling=config.pooling,
        max_text_length=config.max_text_length,
        hidden_size=config.hidden_size,
        id_embedding_note=(
            ", plus a learned ID embedding for items seen in training (text alone for new items)"
            if config.use_id_embeddings
            else " (text only, no ID embeddings)"
        ),
        user_num_layers=config.user_num_layers,
        user_num_heads=config.user_num_heads,
        max_history_length=config.max_history_length,
        similarity_temperature=config.similarity_temperature,
        index_type=facts.index_type,
        num_candidates=config.num_candidates,
        rerank_num_heads=config.rerank_num_heads,
        dataset_description=_dataset_description(training_config, facts.dataset_identity[1]),
        evaluation_protocol=_evaluation_protocol(training_config, facts.eval_results, len(item_ids)),
        evaluation_table=_evaluation_table(facts.eval_results),
        training_config=yaml.safe_dump(training_config, sort_keys=False).strip() if training_config else "# not recorded",
        llmrec_version=__version__,
    )


def _encoder_description(facts: ModelCardFacts) -> tuple[str, str]:
    """(where the encoder's weights are, what they are) for the card's architecture section."""
    if facts.uses_adapter:
        encoder_note = (
            f"The encoder is stored as a PEFT LoRA adapter (`{ENCODER_ADAPTER_FOLDER}/`) on top of "
            f"`{facts.base_model}`, which is loaded from its own repository (or the local copy llmrec knows of)."
        )
        return encoder_note, f"LoRA adapter over `{facts.base_model}`"
    encoder_note = "The encoder's full weights are part of `model.safetensors`."
    return encoder_note, "frozen, full weights stored" if not facts.training_config.get("lora") else "fine-tuned, full weights stored"


def _dataset_description(training_config: dict[str, Any], dataset_name: str) -> str:
    data = training_config.get("data")
    if not data:
        return "The training data was not recorded with this model."
    source = (
        "MovieLens-100k (GroupLens), read from the copy shipped in the RecBole wheel"
        if not data.get("path")
        else f"`{dataset_name}` ({data.get('format', 'auto')} files)"
    )
    threshold = data.get("rating_threshold")
    feedback = f"ratings of at least {threshold} count as interactions" if threshold is not None else "every interaction counts as implicit feedback"
    return f"{source}; {feedback}. Item texts were rendered with the template `{data.get('item_text_template')}`."


def _evaluation_table(eval_results: dict[str, Any]) -> str:
    rows = []
    for split in _EVALUATED_SPLITS:
        for system, all_metrics in eval_results.get(split, {}).items():
            metrics = _ranking_metrics(all_metrics)
            if not rows:
                rows.append("| Split | System | " + " | ".join(_metric_label(metric) for metric in metrics) + " |")
                rows.append("|---|---|" + "---|" * len(metrics))
            values = " | ".join(f"{value:.4f}" for value in metrics.values())
            rows.append(f"| {split} | {_SYSTEM_NAMES.get(system, system)} | {values} |")
    return "\n".join(rows) if rows else "No evaluation results were recorded for this model."


def _evaluation_protocol(training_config: dict[str, Any], eval_results: dict[str, Any], num_items: int) -> str:
    split = training_config.get("data", {}).get("split", "leave_one_out")
    if split == "leave_one_out":
        held_out = (
            "Leave-one-out by time: each user's last interaction is the test target and the one before it the "
            "validation target; everything earlier is training history."
        )
    elif split == "cold_items":
        held_out = (
            "Cold items: a share of the items is held out of training with every interaction on them; `test` is "
            "leave-one-out on the remaining sequences and `cold_test` each user's first interaction with a "
            "held-out item, ranked with the earlier history."
        )
    elif split == "cold_users":
        held_out = (
            "Cold users: a share of the users is held out of training; `test` is leave-one-out on the others and "
            "`cold_test` a held-out user's next item after their first few interactions (`cold_test_with_profile` "
            "adds their profile text, `cold_test_profile_only` uses the profile alone)."
        )
    else:
        held_out = "A global temporal split: interactions after a cut-off time are held out for validation and test."
    test_users = next(iter(eval_results.get("test", {}).values()), {}).get("num_users")
    users = f" There are {int(test_users)} test users." if test_users else ""
    return (
        f"{held_out}{users} Every target is ranked against the full catalogue of {num_items} items (no sampled "
        "negatives) with the user's history removed, and ties count against the target. The head-line "
        "figures (the `model-index` metadata) are the test figures of retrieval + rerank."
    )
