#!/usr/bin/env python
"""Recommend k items for a history and draw which history items the reranker attended to for each.

    python scripts/explain.py runs/ml100k --history 50 172 133 -k 10 --output attention.png
    python scripts/explain.py runs/ml100k --history 50 172 133 --per-head --output attention.svg

Rows are the history items (oldest at the top), columns the recommended items, best first; colour is
the cross-attention weight (`Recommender.explain`), which sums to 1 down each column. Needs matplotlib
(`pip install llmrec[plot]`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from llmrec.errors import LlmRecError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="Model folder (a finetune output_dir) or Hub repo id.")
    parser.add_argument("--history", nargs="+", required=True, metavar="ID", help="Item ids of the history, oldest first.")
    parser.add_argument("-k", type=int, default=10, help="How many recommended items to explain (default 10).")
    parser.add_argument("--per-head", action="store_true", help="One panel per attention head.")
    parser.add_argument("--output", default="attention.png", help="Image file; the extension picks the format.")
    arguments = parser.parse_args(argv)
    if arguments.k <= 0:
        parser.error(f"-k must be positive, got {arguments.k}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)

    from llmrec.cli import silence_progress_bars
    from llmrec.recommender import Recommender
    from llmrec.visualization import plot_attention_heatmap

    silence_progress_bars()

    try:
        recommender = Recommender.from_pretrained(arguments.model)
        recommended = [item_id for item_id, _ in recommender.recommend(arguments.history, k=arguments.k)]
        plot_attention_heatmap(recommender, arguments.history, recommended, arguments.output, per_head=arguments.per_head)
    except (LlmRecError, ImportError, ValueError) as error:  # bad ids or folder, matplotlib missing, bad image format
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {arguments.output}: attention of {len(recommended)} recommended items over a {len(arguments.history)}-item history")
    return 0


if __name__ == "__main__":
    sys.exit(main())
