"""What a model folder is: its file names, the checks a folder passes before any of it is loaded, and the
run metadata (evaluation results, training config) read from beside the model.

`Recommender.from_pretrained` and `llmrec.hub.push_to_hub` both start here, so a folder that would not load is
never published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ModelFolderError
from .modeling import MODEL_FORMAT_VERSION, LlmRecConfig
from .modeling.modeling_llmrec import ENCODER_ADAPTER_FOLDER
from .retrieval.index import sidecar_path
from .utils.integrity import find_custom_code, verify_checksums

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CATALOGUE_FILE = "catalogue.parquet"
INDEX_FILE = "item_index.faiss"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, CATALOGUE_FILE, INDEX_FILE)
MODEL_CARD_FILE = "README.md"
EVAL_RESULTS_FILE = "eval_results.json"
TRAINING_CONFIG_FILE = "config.yaml"


def check_folder(folder: Union[str, Path], verify: bool = False) -> None:
    """Fail early, naming the file, when a model folder is incomplete, from an incompatible llmrec, carries
    code, or (with `verify`) holds a file whose bytes differ from the checksum recorded when it was saved."""
    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(
            f"Model folder {folder} is missing {', '.join(missing)}; copy the whole folder, or save it again "
            "with save_pretrained."
        )
    code = find_custom_code(folder, walk=(ENCODER_ADAPTER_FOLDER,))
    if code or (folder / "adapter_config.json").exists():
        named = ", ".join(str(path) for path in code) or str(folder / "adapter_config.json")
        raise ModelFolderError(
            f"Model folder {folder} carries code or a redirect to another model ({named}): `*.py` files, an "
            "`auto_map` entry, or a top-level adapter_config.json. An llmrec folder never needs them and they are "
            "never run; remove them, or load a folder written by save_pretrained."
        )
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ModelFolderError(f"{folder / CONFIG_FILE} is not valid JSON ({error}); copy or download the folder again.") from error
    if not isinstance(config, dict):
        raise ModelFolderError(
            f"{folder / CONFIG_FILE} holds a JSON {type(config).__name__ if config is not None else 'null'}, not the model's settings; copy or download "
            "the folder again."
        )
    if config.get("model_type") != "llmrec":
        raise ModelFolderError(
            f"{folder / CONFIG_FILE} has model_type {config.get('model_type')!r}, not 'llmrec'; this folder holds "
            "some other model."
        )
    version = config.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        written_by = config.get("llmrec_version", "an unknown llmrec version")
        raise ModelFolderError(
            f"{folder / CONFIG_FILE} has format_version {version} (written by llmrec {written_by}); this llmrec "
            f"reads format_version {MODEL_FORMAT_VERSION}. Load it with the llmrec version that wrote it, or retrain."
        )
    if verify:
        rebuild = "Rebuild the index with `llmrec index MODEL --rebuild`, or copy or download the folder again."
        verify_checksums(folder, config, CONFIG_FILE, hints={INDEX_FILE: rebuild, sidecar_path(INDEX_FILE).name: rebuild})
    try:
        LlmRecConfig.from_dict(config)
    except Exception as error:  # our ConfigError for impossible values, or transformers' own checks
        raise ModelFolderError(
            f"{folder / CONFIG_FILE} holds an impossible setting ({type(error).__name__}: {str(error)[:300]}); copy "
            "or download the folder again."
        ) from error


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
