"""Serving cost after `add_items` (issue 16): `recommend` p50 with new text-only items against warm-only.

One folder is loaded twice; the second copy gets `--new-items` items added by text (re-releases of catalogue
items: the same texts with a suffix, so their lengths are the catalogue's). Calls alternate between the two in
ABBA order over the same test users (garbage collector paused), so machine noise hits both alike. The grown
copy is also timed with `new_items=2` (two slots held for the new items).

    python bench/add_items_latency.py --folder runs/ml100k --name add_items_latency_ml100k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.abba import alternating_timings  # noqa: E402
from bench.common import git_commit, machine, rounded_load_average, table_header, table_row, write_results  # noqa: E402
from bench.rerank_latency import test_histories  # noqa: E402
from llmrec import Recommender  # noqa: E402

TARGET_RATIO = 1.1
CALLS = {  # name -> (model, recommend options)
    "warm only": ("warm", {}),
    "after add_items": ("grown", {}),
    "after add_items, new_items=2": ("grown", {"new_items": 2}),
}


def grown_copy(folder: Path, count: int) -> Recommender:
    recommender = Recommender.from_pretrained(folder)
    rng = np.random.default_rng(0)
    sources = rng.choice(len(recommender.item_ids), size=count, replace=False)
    recommender.add_items([f"new-{n}" for n in range(count)],
                          [f"{recommender.item_texts[source]} (re-release)" for source in sources])
    return recommender


def measure(models: dict[str, Recommender], histories: list[list[str]], repeats: int) -> dict:
    """Milliseconds per `recommend(k=10)` call of each case, alternating ABBA."""
    calls = {}
    for name, (model_name, options) in CALLS.items():
        recommender = models[model_name]
        recommender.recommend(histories[0], k=10, **options)  # warm-up
        calls[name] = lambda position, r=recommender, o=options: r.recommend(histories[position], k=10, **o)
    return alternating_timings(calls, len(histories), repeats)


def render(results: dict) -> str:
    lines = ["# `recommend` after `add_items`: serving latency against the warm-only catalogue", "",
             f"Commit {results['commit']}, {results['machine']['date']}, {results['threads']} thread(s), load at "
             f"start {results['load_average_at_start']}, at end {results['load_average_at_end']}. One user per call, "
             f"k=10, {results['new_items']} items added to the {results['catalogue']}-item catalogue of "
             f"`{results['folder']}`. Made by `bench/add_items_latency.py`.", ""]
    lines += table_header(["call", "p50 ms", "p99 ms", "p50 ratio to warm only", f"target <= {TARGET_RATIO}x"], "lrrrr")
    reference = results["timings"]["warm only"]["p50_ms"]
    for name, timing in results["timings"].items():
        ratio = timing["p50_ms"] / reference
        # The target is the plain call; holding slots for new items is a second ranking, reported beside it.
        verdict = ("met" if ratio <= TARGET_RATIO else "missed") if name == "after add_items" else ""
        lines.append(table_row([name, f"{timing['p50_ms']:.2f}", f"{timing['p99_ms']:.2f}", f"{ratio:.3f}x", verdict]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="A trained model folder.")
    parser.add_argument("--new-items", type=int, default=100, help="Items added by text to the second copy.")
    parser.add_argument("--users", type=int, default=200, help="Test users timed per repeat.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (serving default: one per worker).")
    parser.add_argument("--name", default="add_items_latency_ml100k", help="Results file stem under bench/results/.")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    folder = Path(arguments.folder)
    models = {"warm": Recommender.from_pretrained(folder), "grown": grown_copy(folder, arguments.new_items)}
    results = {"commit": git_commit(), "machine": machine(), "threads": arguments.threads, "folder": str(folder),
               "catalogue": models["warm"].num_items, "new_items": arguments.new_items,
               "load_average_at_start": rounded_load_average()}
    results["timings"] = measure(models, test_histories(folder, arguments.users), arguments.repeats)
    results["load_average_at_end"] = rounded_load_average()
    _, markdown_path = write_results(arguments.name, results, render(results))
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
