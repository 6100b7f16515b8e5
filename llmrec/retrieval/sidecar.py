"""The JSON metadata file ("sidecar") saved next to an item index's FAISS file, written and read back strictly.

FAISS cannot store whether the vectors were normalised, nor the search-time parameters of the index, so
they live in ``<index file>.json``. Reading it checks every field's type and that it agrees with the FAISS
file, so that a mismatched pair (an interrupted save, a hand-edited folder) fails loudly as
`ModelFolderError` instead of searching with the wrong settings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss

from llmrec.errors import ModelFolderError
from llmrec.retrieval.params import INDEX_TYPES, index_type_of

# Flat indexes still write the version-1 sidecar, so folders with the default index stay readable by older
# llmrec; approximate indexes write version 2 (index type and parameters), which older llmrec refuses
# cleanly instead of silently searching with FAISS's own defaults.
FLAT_FORMAT_VERSION = 1
FORMAT_VERSION = 2


def sidecar_path(index_path: str | Path) -> Path:
    """Metadata file saved next to the FAISS file (normalisation cannot be read back from FAISS itself)."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".json")


def sidecar_fields(
    index_type: str,
    normalize: bool,
    dim: int,
    num_items: int,
    params: Mapping[str, Any],
    factory: str | None,
    num_shards: int,
) -> dict[str, Any]:
    """The sidecar of an index; a plain flat one gets the version-1 fields only (see FLAT_FORMAT_VERSION)."""
    meta: dict[str, Any] = {
        "format_version": FLAT_FORMAT_VERSION if index_type == "flat" else FORMAT_VERSION,
        "normalize": normalize,
        "dim": dim,
        "num_items": num_items,
    }
    if index_type != "flat" or num_shards > 1:
        meta.update(format_version=FORMAT_VERSION, index_type=index_type, params=params)
    if factory is not None:
        meta["factory"] = factory
    if num_shards > 1:
        meta["num_shards"] = num_shards
    return meta


def read_sidecar(index_path: Path) -> dict[str, Any]:
    """The checked sidecar of `index_path`; a missing file, a corrupt field or an unknown version raise ModelFolderError."""
    meta_path = sidecar_path(index_path)
    if not index_path.is_file():
        raise ModelFolderError(f"Item index file {index_path} is missing; rebuild the index or re-save the model.")
    if not meta_path.is_file():
        raise ModelFolderError(f"Item index metadata {meta_path} is missing; re-save the index with ItemIndex.save().")
    try:
        meta = _checked_sidecar(json.loads(meta_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError) as error:
        raise ModelFolderError(f"Item index metadata {meta_path} is corrupt ({error}); re-save the index.") from error
    version = meta["format_version"]
    if version not in (FLAT_FORMAT_VERSION, FORMAT_VERSION):
        raise ModelFolderError(
            f"Item index {index_path} has format version {version}; this llmrec reads versions "
            f"{FLAT_FORMAT_VERSION} and {FORMAT_VERSION}. Upgrade llmrec, or rebuild the index (`llmrec index MODEL --rebuild`)."
        )
    return meta


def check_index_type(meta: Mapping[str, Any], faiss_index: faiss.Index) -> None:
    """ValueError unless the FAISS object is of the sidecar's index type (a factory index must name its string)."""
    index_type, factory = meta.get("index_type", "flat"), meta.get("factory")
    if index_type == "factory":
        if not isinstance(factory, str):
            raise ValueError(f"field 'factory' is {factory!r}, not the factory string")
    else:
        stored_type = index_type_of(faiss_index)
        if stored_type != index_type:
            raise ValueError(f"the file holds a {stored_type} index but the metadata says {index_type}")


def check_size(index_path: Path, meta: Mapping[str, Any], dim: int, num_items: int) -> None:
    """ModelFolderError unless the loaded index has the sidecar's dimension and item count."""
    if dim != meta.get("dim") or num_items != meta.get("num_items"):
        raise ModelFolderError(
            f"Item index file {index_path} (dim {dim}, {num_items} items) does not match "
            f"{sidecar_path(index_path)} (dim {meta.get('dim')}, {meta.get('num_items')} items); re-save the index."
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_sidecar(meta: Any) -> dict[str, Any]:
    """The sidecar's fields, each of its type: `bool("false")` is True, so nothing is coerced (ValueError)."""
    if not isinstance(meta, dict):
        raise ValueError(f"it holds a {type(meta).__name__}, not a JSON object")
    for name, kind in (("normalize", bool), ("format_version", int), ("dim", int), ("num_items", int)):
        if name not in meta or not (kind is bool and isinstance(meta[name], bool) or kind is int and _is_count(meta[name])):
            raise ValueError(f"field {name!r} is {meta.get(name, 'missing')!r}")
    if "index_type" in meta and meta["index_type"] not in INDEX_TYPES:
        raise ValueError(f"field 'index_type' is {meta['index_type']!r}, not one of {', '.join(INDEX_TYPES)}")
    params = meta.get("params")
    if params is not None and not (isinstance(params, dict) and all(value is None or _is_count(value) for value in params.values())):
        raise ValueError(f"field 'params' is {params!r}, not a mapping of parameter names to integers")
    return meta
