"""`llmrec index --rebuild`: a fresh FAISS index from a model folder's own item embeddings, written safely."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelFolderError
from .common import ArgumentError, load_recommender

if TYPE_CHECKING:
    from ..recommender import Recommender


def rebuild_index(model_folder: Path, output: Path, overwrite: bool = False) -> "Recommender":
    """Write a FAISS index built from the model's own item embeddings into `output`, then load it normally.

    The index is built from the weights alone, before `Recommender.from_pretrained`, because a missing,
    corrupt or stale index is exactly what makes `from_pretrained` refuse a folder. Into another folder,
    the whole new model folder is built aside and swapped in by renames, so a failure (a full disk) leaves
    `output` as it was; a non-empty `output` is replaced only with `overwrite`.
    """
    if not (model_folder / "config.json").is_file():
        raise ModelFolderError(f"{model_folder} is not a model folder (no config.json); pass the output_dir of a finetune run.")
    if output.exists() and output.resolve() == model_folder.resolve():
        _write_rebuilt_index(output)  # in place: only the index (and its sidecar) are rewritten, each atomically
        return load_recommender(str(output))
    _check_rebuild_target(model_folder, output, overwrite)
    from ..utils.io import atomic_write

    with atomic_write(output) as staging:
        try:
            shutil.copytree(model_folder, staging)
        except (shutil.Error, OSError) as error:
            raise ModelFolderError(
                f"Could not copy {model_folder} to {output} ({_copy_failure(error)}); {output} was left as it was."
            ) from None
        _write_rebuilt_index(staging)
    return load_recommender(str(output))


def _check_rebuild_target(model_folder: Path, output: Path, overwrite: bool) -> None:
    model, target = model_folder.resolve(), output.resolve()
    if target.is_relative_to(model) or model.is_relative_to(target):
        raise ArgumentError(f"--output {output} lies inside {model_folder} or contains it; choose a separate folder.")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise ArgumentError(f"--output {output} exists and is not a folder; choose a folder path.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ArgumentError(
            f"--output {output} is not empty; pass --overwrite to replace it with the rebuilt model, "
            "or choose a new folder."
        )


def _copy_failure(error: OSError) -> str:
    """shutil.copytree reports failed files as a list of (source, destination, reason): name the first."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        failures = error.args[0]
        source, _, reason = failures[0]
        more = f" and {len(failures) - 1} more file(s)" if len(failures) > 1 else ""
        return f"{Path(source).name}: {reason}{more}"
    return error.strerror or str(error)


def _write_rebuilt_index(folder: Path) -> None:
    from ..modeling import LlmRecModel
    from ..recommender import INDEX_FILE
    from ..retrieval import build_item_index
    from ..retrieval.index import sidecar_path
    from ..utils.integrity import record_checksums

    try:
        model = LlmRecModel.from_pretrained(folder, use_safetensors=True)
    except Exception as error:  # corrupt weights: the index cannot be rebuilt from them
        raise ModelFolderError(f"Could not load the model weights in {folder} to rebuild the index ({error}).") from error
    index_type, params = _recorded_index_type(folder / INDEX_FILE)
    build_item_index(model, index_type, **params).save(folder / INDEX_FILE)
    record_checksums(folder, only=(INDEX_FILE, sidecar_path(INDEX_FILE).name))


def _recorded_index_type(index_path: Path) -> tuple[str, dict[str, Any]]:
    """The index type and parameters the old index's sidecar records, so a rebuild keeps them (flat if unreadable)."""
    from ..retrieval.index import sidecar_path

    try:
        meta = json.loads(sidecar_path(index_path).read_text(encoding="utf-8"))
        params = dict(meta.get("params") or {})
        params.update({name: meta[name] for name in ("factory", "num_shards") if name in meta})  # factory / sharded indexes
        return str(meta.get("index_type", "flat")), params
    except (OSError, ValueError, TypeError, AttributeError):
        return "flat", {}
