"""Loading and saving a model folder: find it (a local folder or a Hub snapshot), read its parts with errors
that name the broken file, and save a new folder that replaces the old one as a whole.

`Recommender.from_pretrained` and `Recommender.save_pretrained` are built from these steps;
`llmrec.model_folder` says what a folder holds and checks it before anything is read.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import LlmRecError, ModelFolderError
from .model_folder import (
    CATALOGUE_FILE, CONFIG_FILE, EVAL_RESULTS_FILE, INDEX_FILE, MODEL_CARD_FILE, REQUIRED_FILES, TRAINING_CONFIG_FILE,
    WEIGHTS_FILE,
)
from .modeling import LlmRecModel
from .modeling.modeling_llmrec import ENCODER_ADAPTER_FOLDER
from .modeling.text_encoding import load_tokenizer
from .serving import ServingState
from .utils.integrity import check_links_stay_inside, record_checksums
from .utils.io import CARRYING_MARKER, atomic_write, remove_stale_temporaries, restore_interrupted_replace, write_json_atomic
from .utils.snapshots import download_snapshot, is_hub_repo_id
from .version import __version__

logger = logging.getLogger(__name__)

# Written only for some models; an old copy must not outlive a save that no longer writes it.
_OPTIONAL_OUTPUTS = frozenset({ENCODER_ADAPTER_FOLDER, EVAL_RESULTS_FILE, TRAINING_CONFIG_FILE})
# What llmrec wrote into folders that predate the `file_checksums` manifest in config.json (the tokenizer's
# own files are added from what the tokenizer writes now).
_LEGACY_OUTPUTS = frozenset(
    {*REQUIRED_FILES, INDEX_FILE + ".json", MODEL_CARD_FILE, *_OPTIONAL_OUTPUTS, "tokenizer.json", "tokenizer_config.json",
     "special_tokens_map.json", "vocab.txt", "added_tokens.json", "chat_template.jinja"}
)


# ----- loading -----------------------------------------------------------------------------------------------


def resolve_folder(path_or_repo_id: Union[str, Path], revision: Optional[str], token: Optional[str]) -> Path:
    """The local folder to load, after refusing links out of it (a Hub snapshot's may point into its cache)."""
    folder = Path(path_or_repo_id).expanduser()
    if folder.is_dir() or restore_interrupted_replace(folder):
        check_links_stay_inside(folder, walk=(ENCODER_ADAPTER_FOLDER,))
        remove_stale_temporaries(folder)  # what a save killed mid-write left beside the folder
        return folder
    if not is_hub_repo_id(path_or_repo_id):
        raise ModelFolderError(
            f"Model folder {folder} does not exist; pass the output_dir of a finetune run, a folder written by "
            "Recommender.save_pretrained, or a Hub repo id (user/name)."
        )
    return download_snapshot(str(path_or_repo_id), revision=revision, token=token, walk=(ENCODER_ADAPTER_FOLDER,))


def load_model(folder: Path) -> LlmRecModel:
    """The model's weights (safetensors only, never code from the folder), exactly as config.json describes them."""
    try:
        return LlmRecModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
    except LlmRecError:
        raise
    except Exception as error:  # truncated or corrupt safetensors, shapes that do not match config.json
        raise ModelFolderError(
            f"Could not load the model weights {folder / WEIGHTS_FILE} ({type(error).__name__}: "
            f"{str(error)[:300]}); the file is corrupt or does not match {folder / CONFIG_FILE}. Copy or "
            "download the folder again."
        ) from error


def load_model_tokenizer(folder: Path, model: LlmRecModel) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, checked against the size of the encoder's token embedding table when it has one."""
    try:
        vocab_size = model.item_encoder.backbone.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):  # an encoder without a token embedding table
        vocab_size = None
    return load_tokenizer(folder, vocab_size)


def read_catalogue(folder: Path) -> tuple[list, list, list]:
    """(item ids, item texts, popularity) from the folder's Parquet catalogue."""
    try:
        catalogue = Dataset.from_parquet(str(folder / CATALOGUE_FILE))
        return catalogue["item_id"], catalogue["text"], catalogue["popularity"]
    except Exception as error:
        raise ModelFolderError(
            f"Could not read the catalogue {folder / CATALOGUE_FILE} ({type(error).__name__}: {error}); it "
            "must be Parquet with columns item_id, text, popularity. Copy or download the folder again."
        ) from error


# ----- saving ------------------------------------------------------------------------------------------------


def save_folder(save_directory: Union[str, Path], write: Callable[[Path], None], write_lock: threading.Lock) -> Path:
    """Have `write` fill a new folder beside `save_directory`, record its checksums, and swap it in as a whole.

    `write_lock` is held from the first file to the swap. Entries llmrec did not write are carried over (see
    `_user_entries`); any failure leaves the previous folder as it was and raises `ModelFolderError`.
    """
    save_directory = Path(save_directory).expanduser().resolve()
    if save_directory.exists() and not save_directory.is_dir():
        raise ModelFolderError(f"{save_directory} is a file; save the model to a folder (new or existing).")
    if save_directory == Path.cwd().resolve() or save_directory in Path.cwd().resolve().parents:
        raise ModelFolderError(
            f"Not saving into {save_directory}: it is the working directory (or holds it), which a save swaps "
            "out as a whole. Save to a dedicated folder such as runs/my-model."
        )
    try:
        with write_lock, atomic_write(save_directory, carry_over=_user_entries) as staging:
            staging.mkdir()
            write(staging)
            # Before any user file joins: only what llmrec wrote is checked on load. The card is left
            # out, since it is never read to load and the Hub lets people edit it.
            record_checksums(staging, CONFIG_FILE, exclude=(MODEL_CARD_FILE,))
    except LlmRecError:
        raise
    except Exception as error:  # a full or read-only disk: OSError, SafetensorError, FAISS's RuntimeError
        raise ModelFolderError(
            f"Could not save the model to {save_directory} ({type(error).__name__}: {str(error)[:300]}); the "
            "disk may be full or not writable. The previous folder, if there was one, is unchanged."
        ) from error
    return save_directory


def write_model_files(
    staging: Path, model: LlmRecModel, tokenizer: PreTrainedTokenizerBase, state: ServingState,
    eval_results: Optional[dict[str, Any]], training_config: Optional[dict[str, Any]],
) -> None:
    """Every file llmrec writes but the model card, from one serving state: config, weights, tokenizer,
    catalogue, FAISS index and the run's metadata."""
    model.config.llmrec_version = __version__
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    Dataset.from_dict(
        {"item_id": list(state.item_ids), "text": list(state.item_texts), "popularity": state.item_popularity.tolist()}
    ).to_parquet(str(staging / CATALOGUE_FILE))
    state.pipeline.index.save(staging / INDEX_FILE)
    if eval_results is not None:
        write_json_atomic(staging / EVAL_RESULTS_FILE, eval_results)
    if training_config is not None:
        (staging / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(training_config, sort_keys=False))


def _written_by_llmrec(folder: Path, staging: Path) -> frozenset[str]:
    """Top-level names llmrec wrote into an existing folder: its manifest, or for older llmrec folders the fixed names."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return frozenset()
    if not isinstance(config, dict) or config.get("model_type") != "llmrec":
        return frozenset()  # not an llmrec folder: llmrec wrote nothing in it
    checksums = config.get("file_checksums")
    if isinstance(checksums, dict):
        # The card is llmrec's too, though left out of the checksums (people edit it on the Hub).
        written = {Path(name).parts[0] for name in checksums if isinstance(name, str) and Path(name).parts}
        return frozenset({CONFIG_FILE, MODEL_CARD_FILE} | written)
    return _LEGACY_OUTPUTS | {entry.name for entry in staging.iterdir()}


def _user_entries(folder: Path, staging: Path) -> list[str]:
    """Entries of `folder` that llmrec did not write, to carry into the new folder `staging`.

    Refuses, naming them, when such an entry has a name llmrec writes: the save would overwrite it.
    """
    written = _written_by_llmrec(folder, staging)
    ours = {entry.name for entry in staging.iterdir()} | _OPTIONAL_OUTPUTS
    keep, clashes = [], []
    for entry in folder.iterdir():
        name = entry.name
        leftover = name.startswith(".") and any(name.startswith(f".{own}.tmp-") or name.startswith(f".{own}.old-") for own in ours)
        if name in written or name == CARRYING_MARKER or leftover:
            continue
        (clashes if name in ours else keep).append(name)
    if clashes:
        raise ModelFolderError(
            f"Not saving into {folder}: it holds {', '.join(sorted(clashes))}, which llmrec did not write there but "
            "would overwrite. Move those files away, or save to another (new or llmrec) folder."
        )
    return keep
