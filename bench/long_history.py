"""What the long-history strategy does to the ranking: a short window with and without the summary token.

`bench/attention.py` shows the cost side (window + summary grows linearly with history length). This trains
the default MovieLens-100k model through `scripts/finetune.py` with `model.max_history_length` = `--window`,
once reading only that window and once with `model.history_summary: true` (older items pooled into one
learned token), and reports test NDCG@10 / HR@10 of both next to the default window of 200, for the users
whose history is longer than the window (the only ones the summary can change) and for all users.

    python bench/long_history.py                 # window 50, seed 42, ~25 min on one thread
    python bench/long_history.py --window 20 --threads 2

Writes `bench/results/long_history.json` and `bench/results/long_history.md`.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import table_header, write_json_and_markdown
from llmrec import Recommender
from llmrec.config import load_config
from llmrec.data import build_split, load_interaction_data
from llmrec.evaluation import evaluate_ranking, rerank_score_function, retrieval_score_function

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.long_history")


def train(name: str, overrides: list[str], args: argparse.Namespace) -> Path:
    output_dir = Path(args.work_dir) / name
    if (output_dir / "eval_results.json").is_file():
        logger.info("%s: reusing %s", name, output_dir)
        return output_dir
    command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--config", str(ROOT / args.config),
               "--output_dir", str(output_dir), "--training.seed", str(args.seed),
               "--training.cpu_threads", str(args.threads), *overrides]
    logger.info("%s: %s", name, " ".join(command))
    log = Path(args.work_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    return output_dir


def evaluate(folder: Path, split, long_users: np.ndarray) -> dict[str, Any]:
    """Test metrics of retrieval and rerank, for all users and for those with histories longer than the window."""
    recommender = Recommender.from_pretrained(folder)
    pipeline = recommender.pipeline
    to_model = np.array([0] + [recommender.item_index[item_id] for item_id in split.item_ids])
    results = {}
    for stage, make_scores in (("retrieval", retrieval_score_function), ("rerank", rerank_score_function)):
        score = make_scores(pipeline, split.num_items)
        histories = [to_model[history].tolist() for history in split.test.histories]
        targets = to_model[np.asarray(split.test.targets)]
        everyone = evaluate_ranking(score, histories, targets.tolist(), split.num_items)
        long_only = evaluate_ranking(score, [histories[u] for u in long_users], targets[long_users].tolist(), split.num_items)
        results[stage] = {"all": everyone, "long": long_only}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ml100k.yaml", help="Relative to the repository root.")
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--default-model", default=str(ROOT / "runs" / "bench-quality" / "hybrid-seed42"),
                        help="A default-config model trained with the same seed (bench/quality.py makes it).")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-long-history"))
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "long_history.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (Path(args.default_model) / "config.json").is_file():  # checked before two trainings, not after
        parser.error(f"{args.default_model} holds no trained model; make it with "
                     "`python bench/quality.py --systems hybrid --seeds 42`, or pass --default-model.")
    started = time.perf_counter()

    config = load_config(ROOT / args.config)
    split = build_split(load_interaction_data(config.data), config.data)
    long_users = np.array([user for user, history in enumerate(split.test.histories) if len(history) > args.window])
    window = ["--model.max_history_length", str(args.window)]
    runs = {
        f"window {config.model.max_history_length} (default config)": Path(args.default_model),
        f"window {args.window}": train(f"window{args.window}", [*window, "--model.history_summary", "false"], args),
        f"window {args.window} + summary token": train(f"window{args.window}-summary", [*window, "--model.history_summary", "true"], args),
    }
    results = {
        "window": args.window, "seed": args.seed, "threads": args.threads, "test_users": len(split.test.histories),
        "long_users": int(len(long_users)), "runs": {name: evaluate(folder, split, long_users) for name, folder in runs.items()},
        "date": time.strftime("%Y-%m-%d %H:%M"), "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_1min_at_end": os.getloadavg()[0],
        "command": "python bench/long_history.py " + " ".join(sys.argv[1:]),
    }
    markdown = render_markdown(results)
    write_json_and_markdown(Path(args.output), results, markdown)
    print(markdown)


def render_markdown(results: dict[str, Any]) -> str:
    """long_history.md: NDCG@10 / HR@10 of each window, over all test users and over the long-history ones."""
    window = results["window"]
    lines = [
        f"# Long histories: window {window} with and without the summary token (MovieLens-100k, seed {results['seed']})",
        "",
        f"Test NDCG@10 / HR@10; \"long\" = the {results['long_users']} of {results['test_users']} test users whose history "
        f"is longer than {window} items (the only ones the summary token can change).",
        "",
        *table_header(["model", "retrieval NDCG@10 all", "HR@10 all", "NDCG@10 long", "HR@10 long", "rerank NDCG@10 all",
                       "NDCG@10 long"]),
    ]
    for name, run in results["runs"].items():
        retrieval, rerank = run["retrieval"], run["rerank"]
        lines.append(f"| {name} | {retrieval['all']['ndcg@10']:.4f} | {retrieval['all']['hr@10']:.4f} | "
                     f"{retrieval['long']['ndcg@10']:.4f} | {retrieval['long']['hr@10']:.4f} | "
                     f"{rerank['all']['ndcg@10']:.4f} | {rerank['long']['ndcg@10']:.4f} |")
    lines += ["", f"{results['date']}, {results['threads']} thread(s); `{results['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
