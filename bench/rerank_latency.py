"""Serving cost of a new reranking head against today's: `rerank` of 100 candidates and `recommend`, one user.

Both folders are loaded once; calls alternate between them in ABBA order over the same test users (garbage
collector paused), so machine noise hits both alike, and the table gives p50 / p99 and their ratio. The
head's per-item projections are cached as in serving.

    python bench/rerank_latency.py --reference runs/ml100k --candidate runs/ml100k_text_similarity \
        --name rerank_latency_ml100k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.abba import alternating_timings  # noqa: E402
from bench.common import git_commit, machine, rounded_load_average, table_header, table_row, write_results  # noqa: E402
from llmrec import Recommender  # noqa: E402
from llmrec.config import load_config  # noqa: E402
from llmrec.data import build_split, load_interaction_data  # noqa: E402

TARGETS_MS = {"rerank": 5.0, "recommend": 20.0}


def test_histories(folder: Path, count: int) -> list[list[str]]:
    """The first `count` test users' histories, as raw item ids."""
    config = load_config(folder / "config.yaml")
    split = build_split(load_interaction_data(config.data), config.data)
    return [[split.item_ids[index - 1] for index in history] for history in split.test.histories[:count]]


def measure(models: dict[str, Recommender], histories: list[list[str]], repeats: int) -> dict:
    """Milliseconds per call of each operation and model, alternating ABBA."""
    candidates = {}
    for name, recommender in models.items():  # each model's own 100 FAISS candidates, fixed before timing
        candidates[name] = [[item_id for item_id, _ in recommender.recommend(history, k=100)] for history in histories]
        recommender.recommend(histories[0], k=10)  # warm-up
    calls = {}
    for name, recommender in models.items():
        calls[("rerank", name)] = lambda position, r=recommender, n=name: r.rerank(histories[position], candidates[n][position])
        calls[("recommend", name)] = lambda position, r=recommender: r.recommend(histories[position], k=10)
    timings = alternating_timings(calls, len(histories), repeats)
    return {operation: {name: timings[(operation, name)] for name in models} for operation in TARGETS_MS}


def render(results: dict) -> str:
    reference, candidate = results["reference"], results["candidate"]
    lines = ["# Reranking head: serving latency against today's head", "",
             f"Commit {results['commit']}, {results['machine']['date']}, {results['threads']} thread(s), load at "
             f"start {results['load_average_at_start']}, at end {results['load_average_at_end']}. One user per call, "
             "100 candidates, cached head projections. Made by `bench/rerank_latency.py`.", "",
             f"Reference (today's head): `{reference}`; new head: `{candidate}`.", ""]
    lines += table_header(["operation", "today p50 ms", "new p50 ms", "ratio", "new p99 ms", "target p50"], "lrrrrr")
    for operation, target in TARGETS_MS.items():
        timings = results["timings"][operation]
        old, new = timings["reference"]["p50_ms"], timings["candidate"]["p50_ms"]
        verdict = "met" if new <= target else "missed"
        lines.append(table_row([operation, f"{old:.2f}", f"{new:.2f}", f"{new / old:.2f}x",
                                f"{timings['candidate']['p99_ms']:.2f}", f"<= {target:g} ms: {verdict}"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="Model folder with today's head.")
    parser.add_argument("--candidate", required=True, help="Model folder with the new head.")
    parser.add_argument("--users", type=int, default=200, help="Test users timed per repeat.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (serving default: one per worker).")
    parser.add_argument("--name", default="rerank_latency_ml100k", help="Results file stem under bench/results/.")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    reference, candidate = Path(arguments.reference), Path(arguments.candidate)
    models = {"reference": Recommender.from_pretrained(reference), "candidate": Recommender.from_pretrained(candidate)}
    results = {"commit": git_commit(), "machine": machine(), "threads": arguments.threads,
               "load_average_at_start": rounded_load_average(), "reference": str(reference), "candidate": str(candidate)}
    results["timings"] = measure(models, test_histories(reference, arguments.users), arguments.repeats)
    results["load_average_at_end"] = rounded_load_average()
    _, markdown_path = write_results(arguments.name, results, render(results))
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
