"""`llmrec` command line: recommend, rerank, evaluate, index, explain and push a saved model folder.

A MODEL is the output_dir of a finetune run (or a Hub repo id holding one). Item ids are the data
set's raw ids, as strings. Tables are printed for people; add --json for machine-readable output.

    llmrec recommend runs/ml100k --history 50 172 133 -k 5
    llmrec evaluate runs/ml100k --config configs/ml100k.yaml
    llmrec COMMAND --help      (every command has an example)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TextIO

import yaml

from .errors import DataError, LlmRecError, ModelFolderError, UnknownItemError

if TYPE_CHECKING:
    from .config import ExperimentConfig
    from .recommender import Recommender

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
SPLITS = ("valid", "test")  # the order run_finetune writes them in eval_results.json
TEXT_WIDTH = 48  # item texts are cut to this in tables


class ArgumentError(Exception):
    """A command-line mistake; main() prints it as one `error:` line instead of argparse's usage dump."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(f"{message} (see `{self.prog} --help`)")


# ----- output -----------------------------------------------------------------------------------------


def _short(text: str, width: int = TEXT_WIDTH) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], stream: TextIO | None = None) -> None:
    """Aligned plain-text columns; numbers are right-aligned with 4 decimals, so tables diff cleanly."""
    stream = stream or sys.stdout
    cells = [[f"{value:.4f}" if isinstance(value, float) else str(value) for value in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(row[column], (int, float)) for row in rows) for column in range(len(headers))]
    widths = [max([len(header), *(len(row[column]) for row in cells)]) for column, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [value.rjust(width) if is_number else value.ljust(width) for value, width, is_number in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    print(line(headers), file=stream)
    for row in cells:
        print(line(row), file=stream)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _ranked_records(ranked: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
    """One record per item; `"reserved": true/false` too when slots were held for new items (`--new-items`)."""
    return [{"item_id": item[0], "score": item[1], **({"reserved": item.reserved} if hasattr(item, "reserved") else {})}
            for item in ranked]


def _print_ranked(recommender: "Recommender", ranked: Sequence[tuple[str, float]], as_json: bool) -> None:
    if as_json:
        _print_json(_ranked_records(ranked))
        return
    texts = _item_texts(recommender)
    print_table(
        ["rank", "item_id", "score", "text"],
        [(rank, item_id, score, _short(texts.get(item_id, ""))) for rank, (item_id, score) in enumerate(ranked, start=1)],
    )


def _item_texts(recommender: "Recommender") -> dict[str, str]:
    return dict(zip(recommender.item_ids, recommender.item_texts))


# ----- shared helpers -----------------------------------------------------------------------------------


def silence_progress_bars() -> None:
    """Weight-loading and dataset bars would bury the one-line answers and errors people read."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _load(model: str, verify: bool = True) -> "Recommender":
    from .recommender import Recommender

    logger.info("Loading %s", model)
    return Recommender.from_pretrained(model, verify=verify)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def _recommend_options(arguments: argparse.Namespace) -> dict[str, Any]:
    return {
        "exclude": arguments.exclude,
        "filter": arguments.only,  # an allowed set of ids
        "exclude_history": not arguments.include_history,
        "new_items": arguments.new_items,
    }


def _read_histories(path: Path, known_item_ids: set[str]) -> Iterator[tuple[Any, list[str]]]:
    """(user_id, history) per JSONL line; a bad line is reported with its number rather than a batch position.

    Lines are decoded one by one, so that a non-UTF-8 byte is also named by its line.
    """
    if not path.is_file():
        raise DataError(f"Histories file {path} does not exist.")
    with open(path, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path} line {line_number} is not UTF-8 text (byte {error.start + 1} of the line: "
                                f"{error.reason}); save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {line_number} is not valid JSON ({error.msg}).") from None
            history = record.get("history") if isinstance(record, dict) else None
            if not isinstance(history, list):
                raise DataError(
                    f'{path} line {line_number} needs a "history" list, e.g. {{"user_id": "u1", "history": ["50", "172"]}}.'
                )
            history = [str(item_id) for item_id in history]
            unknown = [item_id for item_id in history if item_id not in known_item_ids]
            if unknown:
                raise DataError(f"{path} line {line_number}: {UnknownItemError(unknown)}")
            yield record.get("user_id"), history


def _validated_histories(path: Path, known_item_ids: set[str]) -> Iterator[tuple[Any, list[str]]]:
    """Read the whole file once to check every line before any result is written, then stream it again.

    On stdout there is no taking back: an error at line 300 must not come after 256 printed results.
    """
    for _ in _read_histories(path, known_item_ids):
        pass
    return _read_histories(path, known_item_ids)


def _batches(records: Iterator[tuple[Any, list[str]]], size: int) -> Iterator[list[tuple[Any, list[str]]]]:
    batch: list[tuple[Any, list[str]]] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----- commands -----------------------------------------------------------------------------------------


def command_recommend(arguments: argparse.Namespace) -> int:
    recommender = _load(arguments.model, verify=not arguments.no_verify)
    options = _recommend_options(arguments)
    if arguments.histories_file is None:
        ranked = recommender.recommend(list(arguments.history), k=arguments.k, **options)
        _print_ranked(recommender, ranked, arguments.json)
        return 0

    records = _validated_histories(Path(arguments.histories_file), set(recommender.item_ids))

    def write_lines(stream: TextIO) -> int:
        written = 0
        for batch in _batches(records, arguments.batch_size):
            histories = [history for _, history in batch]
            for (user_id, _), ranked in zip(batch, recommender.recommend_batch(histories, k=arguments.k, **options)):
                stream.write(json.dumps({"user_id": user_id, "recommendations": _ranked_records(ranked)}, ensure_ascii=False) + "\n")
                written += 1
        return written

    if arguments.output is None:
        write_lines(sys.stdout)
        return 0
    from .utils.io import atomic_write

    with atomic_write(arguments.output) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        written = write_lines(stream)
    print(f"Wrote recommendations for {written} user(s) to {arguments.output}", file=sys.stderr)
    return 0


def command_rerank(arguments: argparse.Namespace) -> int:
    recommender = _load(arguments.model, verify=not arguments.no_verify)
    ranked = recommender.rerank(list(arguments.history), list(arguments.candidates))
    _print_ranked(recommender, ranked, arguments.json)
    return 0


def evaluate_saved_model(recommender: "Recommender", config: "ExperimentConfig", splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Popularity / retrieval / rerank metrics of a saved model on the split `config` builds.

    The same data loading, split, systems and `evaluate_systems` as `run_finetune`, so on the training config
    this reproduces eval_results.json. The split's items are mapped onto the model's catalogue by raw id,
    so a model whose catalogue grew (add_items) still ranks over all of its items.
    """
    import numpy as np

    from .data import EvaluationExamples, build_split, load_interaction_data
    from .evaluation import candidate_systems, evaluate_systems
    from .retrieval import CandidatePipeline

    split = build_split(load_interaction_data(config.data), config.data)
    model_index = {item_id: position + 1 for position, item_id in enumerate(recommender.item_ids)}
    unknown = [item_id for item_id in split.item_ids if item_id not in model_index]
    if unknown:
        shown = ", ".join(repr(item_id) for item_id in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise DataError(
            f"The data set has {len(unknown)} item id(s) the model's catalogue lacks: {shown}{more}. Evaluate on the "
            "data the model was trained on, or add the items first with `llmrec index MODEL --add-items FILE`."
        )
    to_model = np.array([0] + [model_index[item_id] for item_id in split.item_ids], dtype=np.int64)
    num_items = len(recommender.item_ids)
    popularity = np.zeros(num_items + 1, dtype=np.float64)
    popularity[to_model] = split.item_popularity()  # training counts, as run_finetune's baseline uses

    # The saved index and the config's retrieval protocol, as run_finetune's candidate pipeline.
    pipeline = CandidatePipeline(
        recommender.model, recommender.pipeline.index, config.retrieval.num_candidates, config.retrieval.exclude_history
    )
    systems = candidate_systems(pipeline, popularity, num_items)
    evaluations = []
    for split_name in splits:
        examples = getattr(split, split_name)
        mapped = EvaluationExamples(list(examples.user_indices), [to_model[history].tolist() for history in examples.histories],
                                    to_model[examples.targets].tolist())
        evaluations.append((split_name, mapped, systems))
    return evaluate_systems(evaluations, num_items, ks=config.evaluation.ks, batch_size=config.evaluation.batch_size)


def command_evaluate(arguments: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(arguments.config)
    recommender = _load(arguments.model, verify=not arguments.no_verify)
    splits = SPLITS if arguments.split == "both" else (arguments.split,)
    results = evaluate_saved_model(recommender, config, splits)
    if arguments.output:
        from .utils.io import write_json_atomic

        write_json_atomic(arguments.output, results)
    if arguments.json:
        _print_json(results)
        return 0
    metric_names = list(next(iter(next(iter(results.values())).values())))
    rows = [
        (split_name, system, *(metrics[name] for name in metric_names))
        for split_name, systems in results.items()
        for system, metrics in systems.items()
    ]
    print_table(["split", "system", *metric_names], rows)
    return 0


def _read_item_table(arguments: argparse.Namespace) -> tuple[list[str], list[str]]:
    from .data.readers import read_table

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
        return _load(str(output))
    _check_rebuild_target(model_folder, output, overwrite)
    from .utils.io import atomic_write

    with atomic_write(output) as staging:
        try:
            shutil.copytree(model_folder, staging)
        except (shutil.Error, OSError) as error:
            raise ModelFolderError(
                f"Could not copy {model_folder} to {output} ({_copy_failure(error)}); {output} was left as it was."
            ) from None
        _write_rebuilt_index(staging)
    return _load(str(output))


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
    from .modeling import LlmRecModel
    from .recommender import INDEX_FILE
    from .retrieval import build_item_index
    from .retrieval.index import sidecar_path
    from .utils.integrity import record_checksums

    try:
        model = LlmRecModel.from_pretrained(folder, use_safetensors=True)
    except Exception as error:  # corrupt weights: the index cannot be rebuilt from them
        raise ModelFolderError(f"Could not load the model weights in {folder} to rebuild the index ({error}).") from error
    index_type, params = _recorded_index_type(folder / INDEX_FILE)
    build_item_index(model, index_type, **params).save(folder / INDEX_FILE)
    record_checksums(folder, only=(INDEX_FILE, sidecar_path(INDEX_FILE).name))


def _recorded_index_type(index_path: Path) -> tuple[str, dict[str, Any]]:
    """The index type and parameters the old index's sidecar records, so a rebuild keeps them (flat if unreadable)."""
    from .retrieval.index import sidecar_path

    try:
        meta = json.loads(sidecar_path(index_path).read_text(encoding="utf-8"))
        params = dict(meta.get("params") or {})
        params.update({name: meta[name] for name in ("factory", "num_shards") if name in meta})  # factory / sharded indexes
        return str(meta.get("index_type", "flat")), params
    except (OSError, ValueError, TypeError, AttributeError):
        return "flat", {}


def command_index(arguments: argparse.Namespace) -> int:
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
        recommender = _load(arguments.model, verify=not arguments.no_verify)
        recommender.add_items(item_ids, item_texts)
        recommender.save_pretrained(output)
        summary = {"added": len(item_ids)}
    summary.update({"num_items": len(recommender.item_ids), "saved_to": str(output)})
    if arguments.json:
        _print_json(summary)
    elif "added" in summary:
        print(f"Added {summary['added']} item(s); the catalogue now has {summary['num_items']} items. Saved to {output}")
    else:
        print(f"Rebuilt the FAISS index over {summary['num_items']} items. Saved to {output}")
    return 0


def command_explain(arguments: argparse.Namespace) -> int:
    recommender = _load(arguments.model, verify=not arguments.no_verify)
    history = list(arguments.history)
    weights = recommender.explain(history, arguments.item, per_head=arguments.per_head)
    if arguments.png:
        from .visualization import plot_attention_heatmap

        try:
            plot_attention_heatmap(recommender, history, [arguments.item], arguments.png, per_head=arguments.per_head)
        except (ImportError, ValueError) as error:  # matplotlib missing or an unsupported image format
            raise ArgumentError(str(error)) from None
    if arguments.json:
        key = "head_weights" if arguments.per_head else "weight"
        _print_json({"item_id": arguments.item, "history": [{"item_id": item_id, key: value} for item_id, value in weights]})
    else:
        texts = _item_texts(recommender)
        if arguments.per_head:
            num_heads = len(weights[0][1]) if weights else 0
            headers = ["history_item", *(f"head{head}" for head in range(1, num_heads + 1)), "mean", "text"]
            rows = [
                (item_id, *map(float, head_weights), sum(head_weights) / num_heads, _short(texts.get(item_id, "")))
                for item_id, head_weights in weights
            ]
        else:
            headers = ["history_item", "weight", "text"]
            rows = [(item_id, float(weight), _short(texts.get(item_id, ""))) for item_id, weight in weights]
        print(f"Attention of {arguments.item} ({_short(texts.get(arguments.item, ''))}) over the history:")
        print_table(headers, rows)
    if arguments.png:
        print(f"Wrote {arguments.png}", file=sys.stderr)
    return 0


def command_push(arguments: argparse.Namespace) -> int:
    from .hub import push_to_hub

    if not Path(arguments.model).is_dir():
        raise ModelFolderError(f"Model folder {arguments.model} does not exist; pass the output_dir of a finetune run.")
    files = push_to_hub(  # private=None leaves an existing repo's visibility alone
        arguments.model, arguments.repo_id, private=arguments.private or None, token=arguments.token,
        commit_message=arguments.commit_message, dry_run=arguments.dry_run,
    )
    if arguments.json:
        _print_json({"repo_id": arguments.repo_id, "dry_run": arguments.dry_run, "files": list(files)})
        return 0
    verb = "Would upload" if arguments.dry_run else "Uploaded"
    print(f"{verb} {len(files)} file(s) to https://huggingface.co/{arguments.repo_id}:")
    for file in files:
        print(f"  {file}")
    return 0


# ----- parser -------------------------------------------------------------------------------------------


def _add_command(subcommands: Any, name: str, summary: str, example: str, handler: Any) -> argparse.ArgumentParser:
    parser = subcommands.add_parser(
        name, help=summary, description=f"{summary}\n\nexample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="Model folder (a finetune output_dir) or Hub repo id.")
    parser.add_argument("--json", action="store_true", help="Print machine-readable JSON instead of a table.")
    parser.add_argument(
        "--no-verify", action="store_true",
        help="Skip the SHA-256 check of the folder's files against config.json (faster start of a large model).",
    )
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmrec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress (to stderr).")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    recommend = _add_command(
        subcommands, "recommend", "Recommend the top-k items for a history (or for every user of a JSONL file).",
        "llmrec recommend runs/ml100k --history 50 172 133 -k 5 --exclude 181\n"
        "  llmrec recommend runs/ml100k --histories-file users.jsonl --output recs.jsonl\n"
        '  (users.jsonl lines look like {"user_id": "u1", "history": ["50", "172"]})',
        command_recommend,
    )
    source = recommend.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", nargs="*", metavar="ID", help="Item ids the user interacted with, oldest first "
                        "(none = a cold user, who gets the most popular items).")
    source.add_argument("--histories-file", metavar="FILE.jsonl", help='One {"user_id": ..., "history": [...]} per line; '
                        "writes one JSON line of recommendations per user.")
    recommend.add_argument("-k", type=_positive_int, default=10, help="How many items to return (default 10): a positive "
                           "integer; at most the catalogue's size are returned, and k beyond the library's hard cap "
                           "is refused with an error.")
    recommend.add_argument("--exclude", nargs="+", metavar="ID", help="Never recommend these items.")
    recommend.add_argument("--only", nargs="+", metavar="ID", help="Recommend only among these items.")
    recommend.add_argument("--include-history", action="store_true", help="Allow items already in the history.")
    recommend.add_argument("--new-items", type=int, default=0, metavar="N",
                           help="Hold up to N of the k slots for the best items without a trained ID embedding (added "
                           "with add_items); the JSON output marks them \"reserved\": true (default 0: none held).")
    recommend.add_argument("--output", metavar="FILE.jsonl", help="With --histories-file: write here instead of stdout.")
    recommend.add_argument("--batch-size", type=_positive_int, default=256, help="Users per batch (default 256).")

    rerank = _add_command(
        subcommands, "rerank", "Score your own candidate items for a history with the reranking head, best first.",
        "llmrec rerank runs/ml100k --history 50 172 133 --candidates 1 7 100 181", command_rerank,
    )
    rerank.add_argument("--history", nargs="+", required=True, metavar="ID", help="Item ids of the history, oldest first.")
    rerank.add_argument("--candidates", nargs="+", required=True, metavar="ID", help="Item ids to score.")

    evaluate = _add_command(
        subcommands, "evaluate", "Popularity / retrieval / rerank metrics on the split a config builds "
        "(the evaluation run_finetune writes to eval_results.json).",
        "llmrec evaluate runs/ml100k --config runs/ml100k/config.yaml --split test --output test_results.json",
        command_evaluate,
    )
    evaluate.add_argument("--config", required=True, metavar="CONFIG.yaml", help="Experiment config naming the data "
                          "set, split and metrics (a run's own config.yaml reproduces its eval_results.json).")
    evaluate.add_argument("--split", choices=["valid", "test", "both"], default="both", help="Which split (default both).")
    evaluate.add_argument("--output", metavar="RESULTS.json", help="Also write the metrics to this JSON file.")

    index = _add_command(
        subcommands, "index", "Add new items to a model's catalogue and index, or rebuild its FAISS index.",
        "llmrec index runs/ml100k --add-items new_items.csv\n"
        "  llmrec index runs/ml100k --add-items products.jsonl --id-column sku --text-column title --output runs/ml100k-plus\n"
        "  llmrec index runs/ml100k --rebuild",
        command_index,
    )
    action = index.add_mutually_exclusive_group(required=True)
    action.add_argument("--add-items", metavar="FILE", help="CSV/TSV/JSONL/Parquet table of new items (an id and a text column).")
    action.add_argument("--rebuild", action="store_true", help="Rebuild the FAISS index from the model's item embeddings.")
    index.add_argument("--id-column", default="item_id", help="Item id column of --add-items (default item_id).")
    index.add_argument("--text-column", default="text", help="Item text column of --add-items (default text).")
    index.add_argument("--format", choices=["auto", "csv", "tsv", "jsonl", "parquet"], default="auto",
                       help="Format of --add-items (default: from the file extension).")
    index.add_argument("--output", metavar="DIR", help="Save the updated model here instead of back into MODEL.")
    index.add_argument("--overwrite", action="store_true", help="With --rebuild --output: replace a non-empty DIR "
                       "(the new folder is built aside and swapped in whole; without this a non-empty DIR is refused).")

    explain = _add_command(
        subcommands, "explain", "How much each history item weighed in an item's score (cross-attention weights).",
        "llmrec explain runs/ml100k --history 50 172 133 --item 181 --png attention.png", command_explain,
    )
    explain.add_argument("--history", nargs="+", required=True, metavar="ID", help="Item ids of the history, oldest first.")
    explain.add_argument("--item", required=True, metavar="ID", help="The item whose score to explain.")
    explain.add_argument("--per-head", action="store_true", help="One weight per attention head instead of their mean.")
    explain.add_argument("--png", metavar="FILE.png", help="Also draw the weights as a heatmap (needs llmrec[plot]).")

    push = _add_command(
        subcommands, "push", "Upload a model folder to the Hugging Face Hub.",
        "llmrec push runs/ml100k my-name/llmrec-ml100k --private --dry-run", command_push,
    )
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, e.g. my-name/llmrec-ml100k.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached `hf auth login` token).")
    push.add_argument("--commit-message", default="Upload llmrec model", help="Message of the Hub commit.")
    push.add_argument("--dry-run", action="store_true", help="List the files that would be uploaded; upload nothing.")

    from .server.run import add_serve_command  # FastAPI and uvicorn are imported only when `serve` runs

    add_serve_command(subcommands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; LlmRecError and argument mistakes become one `error:` line on stderr and exit code 2."""
    try:
        arguments = build_parser().parse_args(argv)
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_request:  # --help
        return int(exit_request.code or 0)
    if arguments.command == "recommend" and arguments.output and not arguments.histories_file:
        print("error: --output goes with --histories-file (see `llmrec recommend --help`)", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if arguments.verbose else logging.WARNING)
    try:
        if not arguments.verbose:
            silence_progress_bars()
        return arguments.handler(arguments)
    except BrokenPipeError:  # `llmrec ... | head`: the reader left; say nothing more (as the Python docs advise)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (LlmRecError, ArgumentError, OSError) as error:  # OSError: an unwritable --output, a missing folder, ...
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, yaml.YAMLError) as error:
        # Unparsable text in a file the library reads without naming it (a model folder's eval_results.json or
        # config.yaml): still one line, never a traceback. Other ValueErrors are bugs and propagate.
        if not isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError)):
            raise
        print(f"error: a file could not be parsed ({_one_line(error)}); check the model folder's JSON and YAML "
              "files (eval_results.json, config.yaml) and the files you passed.", file=sys.stderr)
        return EXIT_USAGE


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


if __name__ == "__main__":
    sys.exit(main())
