"""Continue training a saved llmrec model on new interactions (`training.init_from`, `finetune.py --init_from`).

The saved folder's items keep their item indices (the catalogue's order) and their learned vectors; items
the new data adds come after them, with their text vectors and new ID-embedding rows that start at zero, so
a new item begins as the text-only vector the model already serves for items added by `add_items` (the
path ID dropout calibrated). New users need nothing: a user is only their history. Training then runs both
stages as usual from the saved weights, and the result is an ordinary model folder (hot-reloadable).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ..config import ExperimentConfig
from ..config.model import per_step_setting_names, stored_setting_names
from ..data import InteractionData, SequentialSplit
from ..errors import ConfigError
from ..modeling import LlmRecModel
from ..modeling.encoders import portable_encoder_name
from ..modeling.text_encoding import embed_item_texts

logger = logging.getLogger(__name__)


class SavedModel(Protocol):
    """The saved model a run continues: a `Recommender` loaded from `training.init_from` (`llmrec.finetune`
    opens it, since loading a folder is the recommender's job, above training)."""

    model: LlmRecModel
    tokenizer: PreTrainedTokenizerBase
    item_ids: tuple[str, ...]
    item_texts: tuple[str, ...]


# Model settings read at each training step take the config's value when a run continues a saved folder;
# the others shape the weights or the meaning of the saved item vectors, so the config must ask for the
# folder's values. Which is which is declared on the `ModelSettings` fields.
RUNTIME_MODEL_SETTINGS = per_step_setting_names()
FIXED_MODEL_SETTINGS = tuple(name for name in stored_setting_names() if name not in RUNTIME_MODEL_SETTINGS)
# Encoder config fields that tell two encoders apart (a folder's encoder weights only fit their architecture).
ENCODER_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_init_folder(config: ExperimentConfig, encoder_path: str) -> None:
    """Refuse, before any data is loaded, a `training.init_from` that is no llmrec folder or does not fit `config`."""
    folder = Path(config.training.init_from).expanduser()
    saved = _folder_config(folder)
    problems = []
    wanted_encoder = portable_encoder_name(encoder_path)
    if not _same_encoder(saved.get("encoder_name_or_path"), wanted_encoder):
        problems.append(f"model.encoder: {saved.get('encoder_name_or_path')!r} in the folder, {wanted_encoder!r} now")
    else:
        problems += _encoder_shape_differences(saved.get("encoder_config") or {}, encoder_path)
    for name in FIXED_MODEL_SETTINGS:
        if name in saved and saved[name] != getattr(config.model, name):
            problems.append(f"model.{name}: {saved[name]!r} in the folder, {getattr(config.model, name)!r} now")
    problems += _lora_differences(folder, saved, config)
    if problems:
        raise ConfigError(
            f"training.init_from {folder} was trained with other settings than this config asks for "
            f"({'; '.join(problems)}). Set them to the folder's values to continue training it, or leave "
            "training.init_from unset to train a new model."
        )


def _same_encoder(saved_name: Any, wanted_name: str) -> bool:
    """Equal names, or two spellings of one local folder (relative / absolute, a trailing slash)."""
    if saved_name == wanted_name:
        return True
    if not isinstance(saved_name, str):
        return False
    saved_path, wanted_path = Path(saved_name).expanduser(), Path(wanted_name).expanduser()
    return saved_path.is_dir() and wanted_path.is_dir() and saved_path.resolve() == wanted_path.resolve()


def _folder_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ConfigError(
            f"training.init_from {folder} is not a folder; give the output_dir of an earlier finetune run "
            "(or a folder written by Recommender.save_pretrained)."
        )
    config_file = folder / "config.json"
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"training.init_from {folder} is not an llmrec model folder: {config_file.name} is missing or unreadable "
            f"({type(error).__name__}). Give the output_dir of an earlier finetune run."
        ) from None
    if not isinstance(saved, dict) or saved.get("model_type") != "llmrec":
        found = saved.get("model_type") if isinstance(saved, dict) else None
        raise ConfigError(
            f"training.init_from {folder} is not an llmrec model folder (its config.json has model_type {found!r}, "
            "not 'llmrec'). To start from a pretrained encoder, set model.encoder instead."
        )
    return saved


def _encoder_shape_differences(saved_encoder: dict[str, Any], encoder_path: str) -> list[str]:
    from transformers import AutoConfig

    try:
        current = AutoConfig.from_pretrained(encoder_path, trust_remote_code=False).to_dict()
    except (OSError, ValueError):  # preflight reports an unreadable encoder config itself
        return []
    return [
        f"encoder {name}: {saved_encoder.get(name)!r} in the folder, {current.get(name)!r} now"
        for name in ENCODER_SHAPE_FIELDS
        if name in saved_encoder and saved_encoder.get(name) != current.get(name)
    ]


def _lora_differences(folder: Path, saved: dict[str, Any], config: ExperimentConfig) -> list[str]:
    """A LoRA-tuned folder goes on with its own adapter, so the config must describe that adapter."""
    if saved.get("encoder_weights") != "adapter":
        return []  # a full encoder: frozen, or with config.lora a fresh adapter on top of it
    if config.lora is None:
        return ["lora: the folder's encoder is LoRA-tuned (encoder_adapter/), the config has no lora section"]
    try:
        adapter = json.loads((folder / "encoder_adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # loading the folder names the missing adapter
    problems = []
    if adapter.get("r") != config.lora.r:
        problems.append(f"lora.r: {adapter.get('r')!r} in the folder, {config.lora.r!r} now")
    if sorted(adapter.get("target_modules") or []) != sorted(config.lora.target_modules):
        problems.append(f"lora.target_modules: {sorted(adapter.get('target_modules') or [])} in the folder, "
                        f"{sorted(config.lora.target_modules)} now")
    return problems


def align_catalogue(data: InteractionData, saved_item_ids: tuple[str, ...], saved_item_texts: tuple[str, ...]) -> InteractionData:
    """`data` with its items table in the saved model's order first, then the items new to it.

    An item of the model that the new data's items table lacks stays, with the model's text, so no item
    index moves. The catalogue of the split built from the result is the continued model's.
    """
    data_ids = [str(item_id) for item_id in data.items["item_id"]]
    data_texts = dict(zip(data_ids, (str(text) for text in data.items["text"])))
    saved = set(saved_item_ids)
    new_ids = [item_id for item_id in data_ids if item_id not in saved]
    kept_only = sum(1 for item_id in saved_item_ids if item_id not in data_texts)
    ids = list(saved_item_ids) + new_ids
    texts = [data_texts.get(item_id, text) for item_id, text in zip(saved_item_ids, saved_item_texts)]
    texts += [data_texts[item_id] for item_id in new_ids]
    logger.info("Continuing a model of %d items: %d new in the data; %d of the model's items are not in the data's "
                "items table and keep the model's text.", len(saved_item_ids), len(new_ids), kept_only)
    items = datasets.Dataset.from_dict({"item_id": ids, "text": texts},
                                       features=datasets.Features({"item_id": datasets.Value("string"),
                                                                   "text": datasets.Value("string")}))
    return InteractionData(interactions=data.interactions, items=items, users=data.users, users_note=data.users_note,
                           timestamps_are_positions=data.timestamps_are_positions)


def grow_for_split(
    saved: SavedModel, split: SequentialSplit, config: ExperimentConfig, device: torch.device,
    precision: str = "fp32",
) -> LlmRecModel:
    """The saved model, grown to the split's catalogue (from `align_catalogue`) and ready to train.

    New items get their text vectors and zero ID rows (`LlmRecModel.add_items`); an old item whose text
    the new data changed gets the new text's vector (its learned ID row is kept). Items with training
    interactions now, or learned before, are warm (their ID embedding is used).
    """
    model = saved.model
    old_count = model.config.num_items
    if tuple(split.item_ids[:old_count]) != tuple(saved.item_ids):
        raise ConfigError("The split's catalogue does not start with the saved model's items; build it from "
                          "align_catalogue's result.")  # a programming error, not a user's
    batch_size = config.training.encode_batch_size
    new_texts = split.item_texts[old_count:]
    if new_texts:
        model.add_items(embed_item_texts(model, saved.tokenizer, new_texts, batch_size, precision=precision))
    changed = [index for index, (old, new) in enumerate(zip(saved.item_texts, split.item_texts), start=1) if old != new]
    if changed:
        logger.info("%d of the model's items have a new text in the data; their text vectors are re-encoded.", len(changed))
        texts = [split.item_texts[index - 1] for index in changed]
        model.item_text_embeddings[torch.tensor(changed)] = embed_item_texts(
            model, saved.tokenizer, texts, batch_size, precision=precision
        ).to(model.item_text_embeddings.dtype)
    popularity = torch.as_tensor(split.item_popularity())
    model.warm_items.copy_(model.warm_items | (popularity > 0).to(model.warm_items.device))
    model.set_item_popularity(popularity)  # the counts of the data it continues on
    for name in RUNTIME_MODEL_SETTINGS:
        setattr(model.config, name, getattr(config.model, name))
    model.config.num_candidates = config.retrieval.num_candidates
    model.config.exclude_history = config.retrieval.exclude_history
    logger.info("Continuing from %s: %d items kept, %d added; %d items warm.", config.training.init_from, old_count,
                len(new_texts), int(model.warm_items.sum()))
    return model.to(device)
