"""`llmrec index`: add new items (from a CSV/TSV/JSONL/Parquet table) to a model's catalogue, or rebuild its index."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import DataError
from .common import ArgumentError, load_recommender
from .output import print_json
from .rebuild import rebuild_index


def _read_item_table(arguments: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(item ids, texts) of `--add-items`; a wrong path, format or column is named before the model is loaded."""
    from ..data.readers import read_table

    path = Path(arguments.add_items)
    if not path.is_file():
        raise DataError(f"Items file {path} does not exist.")
    file_format = arguments.format
    if file_format == "auto":
        suffixes = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
        file_format = suffixes.get(path.suffix.lower())
        if file_format is None:
            raise DataError(f"Cannot tell the format of {path} from its extension; pass --format csv|tsv|jsonl|parquet.")
    table = read_table(path, file_format)
    missing = [column for column in (arguments.id_column, arguments.text_column) if column not in table.columns]
    if missing:
        raise DataError(
            f"{path} has no column(s) {', '.join(map(repr, missing))} (it has {', '.join(map(repr, map(str, table.columns)))}); "
            "name them with --id-column / --text-column."
        )
    if len(table) == 0:
        raise DataError(f"{path} holds no items.")
    item_ids = [str(item_id).strip() for item_id in table[arguments.id_column]]
    if any(not item_id for item_id in item_ids):
        raise DataError(f"{path}: column {arguments.id_column!r} has empty item ids.")
    return item_ids, ["" if text is None else str(text) for text in table[arguments.text_column]]


def command_index(arguments: argparse.Namespace) -> int:
    """`--add-items FILE` (into MODEL, or a copy at `--output`) or `--rebuild`; prints what changed."""
    if not Path(arguments.model).is_dir() and (arguments.rebuild or arguments.output is None):
        raise ArgumentError(
            f"{arguments.model} is not a local model folder; --rebuild needs one, and --add-items needs --output DIR "
            "for a Hub model."
        )
    if arguments.overwrite and not (arguments.rebuild and arguments.output):
        raise ArgumentError("--overwrite goes with --rebuild --output DIR (see `llmrec index --help`)")
    output = Path(arguments.output or arguments.model)
    if arguments.rebuild:
        recommender = rebuild_index(Path(arguments.model), output, overwrite=arguments.overwrite)
        summary: dict[str, Any] = {"rebuilt": True}
    else:
        item_ids, item_texts = _read_item_table(arguments)
        recommender = load_recommender(arguments.model, verify=not arguments.no_verify)
        recommender.add_items(item_ids, item_texts)
        recommender.save_pretrained(output)
        summary = {"added": len(item_ids)}
    summary.update({"num_items": len(recommender.item_ids), "saved_to": str(output)})
    if arguments.json:
        print_json(summary)
    elif "added" in summary:
        print(f"Added {summary['added']} item(s); the catalogue now has {summary['num_items']} items. Saved to {output}")
    else:
        print(f"Rebuilt the FAISS index over {summary['num_items']} items. Saved to {output}")
    return 0

