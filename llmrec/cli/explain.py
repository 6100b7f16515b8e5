"""`llmrec explain`: how much each history item weighed in one item's score (the reranker's cross-attention)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .common import ArgumentError, load_recommender
from .output import item_texts, print_json, print_table, short_text

if TYPE_CHECKING:
    from ..recommender import Recommender


def command_explain(arguments: argparse.Namespace) -> int:
    """The weights as a table (or JSON), and with `--png` also as a heatmap image."""
    recommender = load_recommender(arguments.model, verify=not arguments.no_verify)
    history = list(arguments.history)
    weights = recommender.explain(history, arguments.item, per_head=arguments.per_head)
    if arguments.png:
        from ..visualization import plot_attention_heatmap

        try:
            plot_attention_heatmap(recommender, history, [arguments.item], arguments.png, per_head=arguments.per_head)
        except (ImportError, ValueError) as error:  # matplotlib missing or an unsupported image format
            raise ArgumentError(str(error)) from None
    if arguments.json:
        key = "head_weights" if arguments.per_head else "weight"
        print_json({"item_id": arguments.item, "history": [{"item_id": item_id, key: value} for item_id, value in weights]})
    else:
        _print_attention_table(recommender, arguments.item, weights, arguments.per_head)
    if arguments.png:
        print(f"Wrote {arguments.png}", file=sys.stderr)
    return 0


def _print_attention_table(recommender: "Recommender", item: str, weights: Sequence[tuple[str, Any]], per_head: bool) -> None:
    """One row per history item: its weight (or one per head and their mean) and its text."""
    texts = item_texts(recommender)
    if per_head:
        num_heads = len(weights[0][1]) if weights else 0
        headers = ["history_item", *(f"head{head}" for head in range(1, num_heads + 1)), "mean", "text"]
        rows = [
            (item_id, *map(float, head_weights), sum(head_weights) / num_heads, short_text(texts.get(item_id, "")))
            for item_id, head_weights in weights
        ]
    else:
        headers = ["history_item", "weight", "text"]
        rows = [(item_id, float(weight), short_text(texts.get(item_id, ""))) for item_id, weight in weights]
    print(f"Attention of {item} ({short_text(texts.get(item, ''))}) over the history:")
    print_table(headers, rows)
