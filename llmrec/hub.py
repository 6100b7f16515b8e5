"""The Hugging Face Hub side of a saved model: its model card and the upload of its folder.

The card is rendered from `model_cards/llmrec_model_card.md` with `huggingface_hub.ModelCard`, so the
metadata header (library, tags, datasets, base model, `model-index` metrics) is the Hub's own format.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .errors import HubUploadError, ModelFolderError
from .model_folder import REQUIRED_FILES, check_folder
from .modeling import LlmRecConfig
from .modeling.modeling_llmrec import ENCODER_ADAPTER_FOLDER
from .utils.integrity import check_links_stay_inside
from .utils.snapshots import is_hub_repo_id
from .version import __version__

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = "llmrec_model_card.md"
MODEL_CARD_FILE = "README.md"
EVAL_RESULTS_FILE = "eval_results.json"
TRAINING_CONFIG_FILE = "config.yaml"
# Left out of uploads: resumable training state is not part of the model.
_NOT_UPLOADED = ("checkpoints",)
_SYSTEM_NAMES = {"popularity": "Popularity", "retrieval": "llmrec retrieval", "rerank": "llmrec retrieval + rerank"}
_METRIC_NAMES = {"ndcg": "NDCG", "hr": "HR", "mrr": "MRR"}


def _ranking_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The @k metrics of an evaluation, without bookkeeping entries such as num_users."""
    return {name: value for name, value in metrics.items() if "@" in name}


def model_card_template_path() -> Path:
    """The repository's `model_cards/` template; wheels ship that folder as `llmrec.model_cards`."""
    in_checkout = Path(__file__).resolve().parents[1] / "model_cards" / MODEL_CARD_TEMPLATE
    if in_checkout.is_file():  # a source checkout or an editable install
        return in_checkout
    return Path(str(importlib.resources.files("llmrec.model_cards") / MODEL_CARD_TEMPLATE))


def _dataset_identity(training_config: dict[str, Any]) -> tuple[str, str]:
    """(Hub-style id, readable name) of the training data, from the run's `data` section."""
    data = training_config.get("data", {})
    if not data.get("path"):
        return "movielens-100k", "MovieLens-100k"
    name = Path(str(data["path"])).expanduser().name or str(data["path"])
    return name.lower().replace(" ", "-"), name


def _metric_label(metric: str) -> str:
    """'ndcg@10' -> 'NDCG@10'."""
    name, _, k = metric.partition("@")
    return f"{_METRIC_NAMES.get(name, name.upper())}@{k}" if k else _METRIC_NAMES.get(name, name)


def _evaluation_table(eval_results: dict[str, Any]) -> str:
    rows = []
    for split in ("test", "cold_test", "cold_test_with_profile", "cold_test_profile_only", "valid"):
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


def render_model_card(
    config: LlmRecConfig,
    item_ids: Sequence[str],
    eval_results: Optional[dict[str, Any]] = None,
    training_config: Optional[dict[str, Any]] = None,
    repo_id: Optional[str] = None,
    index_type: str = "IndexFlatIP",
) -> ModelCard:
    """A model card with the run's real numbers: metadata header for the Hub, then usage, data, metrics, limits."""
    eval_results = eval_results or {}
    training_config = training_config or {}
    base_model = config.encoder_name_or_path or "unknown"
    dataset_id, dataset_name = _dataset_identity(training_config)
    model_name = repo_id.split("/")[-1] if repo_id else f"llmrec-{dataset_id}"

    evaluations = [
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
        for metric, value in _ranking_metrics(eval_results.get("test", {}).get("rerank", {})).items()
    ]
    tags = ["llmrec", "recommendation", "sequential-recommendation", "faiss", "cross-attention"]
    if config.encoder_weights == "adapter":
        tags += ["peft", "lora"]
    card_data = ModelCardData(
        library_name="llmrec",
        tags=tags,
        datasets=[dataset_id],
        base_model=base_model if is_hub_repo_id(base_model) else None,
        model_name=model_name,
        eval_results=evaluations or None,
    )
    example_history = [str(item_id) for item_id in item_ids[:3]]
    if config.encoder_weights == "adapter":
        encoder_note = (
            f"The encoder is stored as a PEFT LoRA adapter (`{ENCODER_ADAPTER_FOLDER}/`) on top of "
            f"`{base_model}`, which is loaded from its own repository (or the local copy llmrec knows of)."
        )
        encoder_weights = f"LoRA adapter over `{base_model}`"
    else:
        encoder_note = "The encoder's full weights are part of `model.safetensors`."
        encoder_weights = "frozen, full weights stored" if not training_config.get("lora") else "fine-tuned, full weights stored"
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template_path()),
        model_name=model_name,
        repo_id=repo_id or "path/to/this/folder",
        base_model=base_model,
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
        index_type=index_type,
        num_candidates=config.num_candidates,
        rerank_num_heads=config.rerank_num_heads,
        dataset_description=_dataset_description(training_config, dataset_name),
        evaluation_protocol=_evaluation_protocol(training_config, eval_results, len(item_ids)),
        evaluation_table=_evaluation_table(eval_results),
        training_config=yaml.safe_dump(training_config, sort_keys=False).strip() if training_config else "# not recorded",
        llmrec_version=__version__,
    )


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


def files_to_upload(folder: Union[str, Path]) -> list[str]:
    """Every file of a model folder that belongs on the Hub, as sorted POSIX paths relative to the folder.

    Hidden entries (temporary files of an interrupted save) and training checkpoints are left out.
    """
    folder = Path(folder)
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and relative.parts[0] not in _NOT_UPLOADED:
            files.append(relative.as_posix())
    return sorted(files)


def push_to_hub(
    folder: Union[str, Path],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload llmrec model",
    dry_run: bool = False,
) -> list[str]:
    """Upload a saved model folder to a Hub model repo in one commit; returns the files (uploaded, or that would be).

    The folder must pass the checks `Recommender.from_pretrained` starts with (`check_folder`, every file's
    checksum included), so a broken model is never published. With `dry_run` nothing touches the network.
    """
    folder = Path(folder)
    missing = [name for name in (*REQUIRED_FILES, MODEL_CARD_FILE) if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(
            f"{folder} is missing {', '.join(missing)}; push the output_dir of a finetune run or a folder written "
            "by Recommender.save_pretrained."
        )
    check_links_stay_inside(folder, walk=(ENCODER_ADAPTER_FOLDER,))  # a link could upload files from outside it
    check_folder(folder, verify=True)
    files = files_to_upload(folder)
    if dry_run:
        return files
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", allow_patterns=files, commit_message=commit_message
        )
    except Exception as error:  # HTTP, auth and connection errors from huggingface_hub/requests
        raise HubUploadError(
            f"Uploading {folder} to {repo_id} failed ({type(error).__name__}: {error}); check the network, "
            "log in with `hf auth login` (or pass a token), and that you may write to that repo."
        ) from error
    logger.info("Uploaded %d files from %s to https://huggingface.co/%s", len(files), folder, repo_id)
    return files


def _read_mapping(path: Path, parse: Any, kind: str) -> Optional[dict[str, Any]]:
    """A JSON or YAML file holding one mapping, or None when absent; anything else names the file."""
    if not path.is_file():
        return None
    try:
        content = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as error:
        raise ModelFolderError(
            f"{path} is not valid {kind} ({type(error).__name__}: {str(error)[:200]}); copy or download the folder "
            "again, or delete the file (the model loads without it)."
        ) from error
    if not isinstance(content, dict):
        raise ModelFolderError(
            f"{path} holds a {type(content).__name__}, not a {kind} mapping; copy or download the folder again, or "
            "delete the file (the model loads without it)."
        )
    return content


def read_run_metadata(folder: Path) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """The eval results and training config saved beside a model, when the folder has them."""
    return (
        _read_mapping(folder / EVAL_RESULTS_FILE, json.loads, "JSON"),
        _read_mapping(folder / TRAINING_CONFIG_FILE, yaml.safe_load, "YAML"),
    )
