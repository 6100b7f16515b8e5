#!/usr/bin/env python
"""Issue 18's micro-batching target: `recommend_batch` of all 943 MovieLens-100k users vs one-by-one `recommend`.

The model is `serving_ab.build_folder`'s ml100k-shaped one (1,682 items, random item vectors: it costs what a
trained one costs); the histories are MovieLens-100k's own (every user's items in time order, from the default
config's data), so the batch has the real mix of lengths (20 to 737 items, window 200). Two checkouts, each in
its own process with the same torch threads, run in alternating rounds (A B B A ...), and each round times
`--singles` one-user calls and one `recommend_batch` of all users, k=10. The first batch answers of the two
checkouts are compared (same ranking, scores within 1e-5).

    git worktree add /tmp/bs-base main
    python bench/batch_speed.py --base /tmp/bs-base

Writes bench/results/batch_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import load_average, loadavg_text, markdown_table, write_results  # noqa: E402
from serving_ab import model_and_histories_files, stop_workers  # noqa: E402  (the ml100k-shaped model, one builder for both benchmarks)

WORKER = r"""
import json, sys, time, gc
import torch
torch.set_num_threads(int(sys.argv[3]))
import llmrec
from llmrec import Recommender
recommender = Recommender.from_pretrained(sys.argv[1])
histories = json.loads(open(sys.argv[2]).read())
first = recommender.recommend_batch(histories, k=10)
for history in histories[:20]:
    recommender.recommend(history, k=10)
print(json.dumps({"llmrec": llmrec.__file__, "answers": first}), flush=True)
call = 0
for line in sys.stdin:
    kind, count = line.split()
    gc.collect(); gc.disable()
    start = time.perf_counter()
    if kind == "single":
        for _ in range(int(count)):
            recommender.recommend(histories[call % len(histories)], k=10)
            call += 1
    else:
        recommender.recommend_batch(histories, k=10)
    elapsed = time.perf_counter() - start
    gc.enable()
    print(json.dumps(elapsed), flush=True)
"""


def ml100k_histories() -> list[list[str]]:
    """Every MovieLens-100k user's items, oldest first (item ids 1..1682, as in the built model)."""
    sys.path.insert(0, str(ROOT))
    from llmrec.config import load_config
    from llmrec.data import load_interaction_data

    table = load_interaction_data(load_config(None).data).interactions.to_pandas()
    table = table.sort_values(["user_id", "timestamp"], kind="stable")
    return [group["item_id"].astype(str).tolist() for _, group in table.groupby("user_id", sort=True)]


def start_worker(checkout: Path, folder: Path, histories_file: Path, threads: int) -> tuple[subprocess.Popen, list]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(histories_file), str(threads)], env=env,
                              cwd=checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    hello = json.loads(worker.stdout.readline())
    if not hello["llmrec"].startswith(str(checkout)):
        raise RuntimeError(f"worker imported {hello['llmrec']}, not the checkout {checkout}")
    return worker, hello["answers"]


def timed(worker: subprocess.Popen, kind: str, count: int) -> float:
    worker.stdin.write(f"{kind} {count}\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def compare(base: list, this: list) -> dict:
    """Same ids in the same order for every user, and the largest score difference."""
    same = all([item for item, _ in a] == [item for item, _ in b] for a, b in zip(base, this)) and len(base) == len(this)
    gap = max(abs(sa - sb) for a, b in zip(base, this) for (_, sa), (_, sb) in zip(a, b))
    return {"same_ranking": bool(same), "max_score_difference": float(gap)}


def render_markdown(summary: dict) -> str:
    """bench/results/batch_speed.md: every round, then the medians and whether both checkouts answered alike."""
    rounds = [[number, f"{entry['load1']:.2f}", f"{entry['base']['single']:.0f}", f"{entry['base']['batch']:.0f}",
               f"{entry['this']['single']:.0f}", f"{entry['this']['batch']:.0f}"]
              for number, entry in enumerate(summary["rounds"], start=1)]
    median = summary["median"]
    medians = [[name, f"{median[name]['single']:.0f}", f"{median[name]['batch']:.0f}", f"{median[name]['ratio']:.2f}x"]
               for name in ("base", "this")]
    lines = [
        "# recommend_batch vs one-by-one recommend (issue 18)", "",
        f"{summary['date']}, {summary['cpus']} CPUs, torch threads {summary['threads']}, {summary['users']} MovieLens-100k users "
        f"(full histories, window 200), k=10, ml100k-shaped random model. `bench/batch_speed.py --base {summary['base']}`.", "",
        markdown_table(["round", "load1", "base single u/s", "base batch u/s", "this single u/s", "this batch u/s"], rounds),
        "", "Medians over rounds (users/s):", "",
        markdown_table(["checkout", "one-by-one recommend", "recommend_batch (943)", "batch / single"], medians),
        "", f"recommend_batch speed-up this / base: {summary['batch_speedup']:.2f}x; one-user recommend this / base: "
        f"{summary['single_speedup']:.2f}x.",
        f"Answers: same ranking for every user: {summary['answers']['same_ranking']}; largest score difference "
        f"{summary['answers']['max_score_difference']:.2e}.", f"/proc/loadavg at the end: {summary['loadavg_end']}.", "",
    ]
    return "\n".join(lines)


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="The reference checkout (e.g. a git worktree of main).")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--singles", type=int, default=300, help="Timed one-user calls per checkout per round.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (2 on a loaded 2-core machine spins in OpenMP).")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-batch-speed"))
    args = parser.parse_args()
    folder, histories_file = model_and_histories_files(Path(args.workdir))
    histories = ml100k_histories()
    histories_file.write_text(json.dumps(histories))
    checkouts = {"base": Path(args.base).resolve(), "this": ROOT}
    started = {name: start_worker(checkout, folder, histories_file, args.threads) for name, checkout in checkouts.items()}
    workers = {name: worker for name, (worker, _) in started.items()}
    rounds = []
    try:
        for number in range(args.rounds):
            load = load_average()[0]
            entry = {"load1": load}
            for name in ("base", "this") if number % 2 == 0 else ("this", "base"):
                entry[name] = {"single": args.singles / timed(workers[name], "single", args.singles),
                               "batch": len(histories) / timed(workers[name], "batch", 1)}
            rounds.append(entry)
            print(f"round {number + 1} (load1 {load:.2f}): " + ", ".join(
                f"{name} single {entry[name]['single']:.0f} u/s batch {entry[name]['batch']:.0f} u/s" for name in checkouts), flush=True)
    finally:
        stop_workers(workers)
    median = {name: {kind: float(np.median([entry[name][kind] for entry in rounds])) for kind in ("single", "batch")}
              for name in checkouts}
    for values in median.values():
        values["ratio"] = values["batch"] / values["single"]
    summary = {
        "base": str(checkouts["base"]), "this": str(ROOT), "users": len(histories), "threads": args.threads,
        "singles_per_round": args.singles, "rounds": rounds, "median": median,
        "batch_speedup": median["this"]["batch"] / median["base"]["batch"],
        "single_speedup": median["this"]["single"] / median["base"]["single"],
        "answers": compare(started["base"][1], started["this"][1]),
        "loadavg_end": loadavg_text(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_results("batch_speed", summary, render_markdown(summary))
    print(f"batch/single: base {median['base']['ratio']:.2f}x, this {median['this']['ratio']:.2f}x; answers {summary['answers']}")


if __name__ == "__main__":
    main()
