"""`llmrec recommend` (top-k for one history or for every user of a JSONL file) and `llmrec rerank`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from .common import load_recommender
from .histories import batches, validated_histories
from .output import print_ranked, ranked_records


def _recommend_options(arguments: argparse.Namespace) -> dict[str, Any]:
    return {
        "exclude": arguments.exclude,
        "filter": arguments.only,  # an allowed set of ids
        "exclude_history": False if arguments.include_history else None,  # None: as the model was trained
        "new_items": arguments.new_items,
        "diversity": arguments.diversity,
    }


def command_recommend(arguments: argparse.Namespace) -> int:
    """A table (or JSON) for `--history`; one JSON line per user for `--histories-file`, to stdout or `--output`."""
    recommender = load_recommender(arguments.model, verify=not arguments.no_verify)
    options = _recommend_options(arguments)
    if arguments.histories_file is None:
        ranked = recommender.recommend(list(arguments.history), k=arguments.k, **options)
        print_ranked(recommender, ranked, arguments.json)
        return 0

    records = validated_histories(Path(arguments.histories_file), set(recommender.item_ids))

    def write_lines(stream: TextIO) -> int:
        written = 0
        for batch in batches(records, arguments.batch_size):
            histories = [history for _, history in batch]
            for (user_id, _), ranked in zip(batch, recommender.recommend_batch(histories, k=arguments.k, **options)):
                stream.write(json.dumps({"user_id": user_id, "recommendations": ranked_records(ranked)}, ensure_ascii=False) + "\n")
                written += 1
        return written

    if arguments.output is None:
        write_lines(sys.stdout)
        return 0
    from ..utils.io import atomic_write

    with atomic_write(arguments.output) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        written = write_lines(stream)
    print(f"Wrote recommendations for {written} user(s) to {arguments.output}", file=sys.stderr)
    return 0


def command_rerank(arguments: argparse.Namespace) -> int:
    """Scores of the user's own candidates by the reranking head, best first."""
    recommender = load_recommender(arguments.model, verify=not arguments.no_verify)
    ranked = recommender.rerank(list(arguments.history), list(arguments.candidates))
    print_ranked(recommender, ranked, arguments.json)
    return 0
