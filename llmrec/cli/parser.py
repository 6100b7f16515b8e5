"""The `llmrec` argument parser: a table of the commands (`_COMMANDS`), and one small function per command that
adds that command's own options.

Each command's help ends with an example, so `llmrec COMMAND --help` shows how to call it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NamedTuple

from .common import ArgumentError
from .evaluate import command_evaluate
from .explain import command_explain
from .index import command_index
from .push import command_push
from .recommend import command_recommend, command_rerank

# `llmrec --help` opens with this; it says what a MODEL and an item id are, once for every command.
DESCRIPTION = """`llmrec` command line: recommend, rerank, evaluate, index, explain and push a saved model folder.

A MODEL is the output_dir of a finetune run (or a Hub repo id holding one). Item ids are the data
set's raw ids, as strings. Tables are printed for people; add --json for machine-readable output.

    llmrec recommend runs/ml100k --history 50 172 133 -k 5
    llmrec evaluate runs/ml100k --config configs/ml100k.yaml
    llmrec COMMAND --help      (every command has an example)
"""


class _Parser(argparse.ArgumentParser):
    """Raises ArgumentError, so main() prints one `error:` line instead of argparse exiting with a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(f"{message} (see `{self.prog} --help`)")


def _positive_int(value: str) -> int:
    """The type of -k and --batch-size: 0, a negative number or a non-number is a usage error naming the value."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def _unit_fraction(value: str) -> float:
    """The type of --diversity: a number from 0 to 1, checked before the model loads (NaN is not one)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}")
    return number


def _add_command(subcommands: Any, name: str, summary: str, example: str, handler: Any) -> argparse.ArgumentParser:
    """A subcommand with the MODEL, --json and --no-verify that every command but serve takes."""
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


def _recommend_options(recommend: argparse.ArgumentParser) -> None:
    """Where the history comes from (--history or --histories-file), how many items and which ones."""
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
    recommend.add_argument("--diversity", type=_unit_fraction, default=0.0, metavar="LAMBDA",
                           help="Re-rank by maximal marginal relevance in the item-text space: 0 (default) = the plain "
                           "ranking, up to 1 = only unlikeness to the items already picked; scores stay relevance scores.")
    recommend.add_argument("--output", metavar="FILE.jsonl", help="With --histories-file: write here instead of stdout.")
    recommend.add_argument("--batch-size", type=_positive_int, default=256, help="Users per batch (default 256).")


def _rerank_options(rerank: argparse.ArgumentParser) -> None:
    """The history and the candidates to score."""
    rerank.add_argument("--history", nargs="+", required=True, metavar="ID", help="Item ids of the history, oldest first.")
    rerank.add_argument("--candidates", nargs="+", required=True, metavar="ID", help="Item ids to score.")


def _evaluate_options(evaluate: argparse.ArgumentParser) -> None:
    """The config that builds the split, which split, and where to save the metrics."""
    evaluate.add_argument("--config", required=True, metavar="CONFIG.yaml", help="Experiment config naming the data "
                          "set, split and metrics (a run's own config.yaml reproduces its eval_results.json).")
    evaluate.add_argument("--split", choices=["valid", "test", "both"], default="both", help="Which split (default both).")
    evaluate.add_argument("--output", metavar="RESULTS.json", help="Also write the metrics to this JSON file.")


def _index_options(index: argparse.ArgumentParser) -> None:
    """What to do (--add-items or --rebuild), how to read the items table, and where to save."""
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


def _explain_options(explain: argparse.ArgumentParser) -> None:
    """The history, the item to explain, and how to show the weights."""
    explain.add_argument("--history", nargs="+", required=True, metavar="ID", help="Item ids of the history, oldest first.")
    explain.add_argument("--item", required=True, metavar="ID", help="The item whose score to explain.")
    explain.add_argument("--per-head", action="store_true", help="One weight per attention head instead of their mean.")
    explain.add_argument("--png", metavar="FILE.png", help="Also draw the weights as a heatmap (needs llmrec[plot]).")


def _push_options(push: argparse.ArgumentParser) -> None:
    """The Hub repository and how to upload."""
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, e.g. my-name/llmrec-ml100k.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached `hf auth login` token).")
    push.add_argument("--commit-message", default="Upload llmrec model", help="Message of the Hub commit.")
    push.add_argument("--dry-run", action="store_true", help="List the files that would be uploaded; upload nothing.")


class _Command(NamedTuple):
    """One subcommand: its help (a summary and examples), the function that runs it, the one that adds its options."""

    name: str
    summary: str
    example: str
    handler: Callable[[argparse.Namespace], int]
    add_options: Callable[[argparse.ArgumentParser], None]


# In the order `llmrec --help` lists them; `serve` comes last, from llmrec/server/run.py.
_COMMANDS = (
    _Command("recommend", "Recommend the top-k items for a history (or for every user of a JSONL file).",
             "llmrec recommend runs/ml100k --history 50 172 133 -k 5 --exclude 181\n"
             "  llmrec recommend runs/ml100k --histories-file users.jsonl --output recs.jsonl\n"
             '  (users.jsonl lines look like {"user_id": "u1", "history": ["50", "172"]})',
             command_recommend, _recommend_options),
    _Command("rerank", "Score your own candidate items for a history with the reranking head, best first.",
             "llmrec rerank runs/ml100k --history 50 172 133 --candidates 1 7 100 181", command_rerank, _rerank_options),
    _Command("evaluate", "Popularity / retrieval / rerank metrics on the split a config builds "
             "(the evaluation run_finetune writes to eval_results.json).",
             "llmrec evaluate runs/ml100k --config runs/ml100k/config.yaml --split test --output test_results.json",
             command_evaluate, _evaluate_options),
    _Command("index", "Add new items to a model's catalogue and index, or rebuild its FAISS index.",
             "llmrec index runs/ml100k --add-items new_items.csv\n"
             "  llmrec index runs/ml100k --add-items products.jsonl --id-column sku --text-column title --output runs/ml100k-plus\n"
             "  llmrec index runs/ml100k --rebuild",
             command_index, _index_options),
    _Command("explain", "How much each history item weighed in an item's score (cross-attention weights).",
             "llmrec explain runs/ml100k --history 50 172 133 --item 181 --png attention.png", command_explain, _explain_options),
    _Command("push", "Upload a model folder to the Hugging Face Hub.",
             "llmrec push runs/ml100k my-name/llmrec-ml100k --private --dry-run", command_push, _push_options),
)


def build_parser() -> argparse.ArgumentParser:
    """The whole `llmrec` parser; each subcommand sets `handler`, the function main() calls with the arguments."""
    parser = _Parser(prog="llmrec", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress (to stderr).")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command.add_options(_add_command(subcommands, command.name, command.summary, command.example, command.handler))

    from ..server.run import add_serve_command  # FastAPI and uvicorn are imported only when `serve` runs

    add_serve_command(subcommands)
    return parser
