#!/usr/bin/env python
"""`recommend` p50 of two llmrec checkouts on the same model folder, in alternating rounds (A B B A ...).

Issue 13 asks that the immutable serving state and the request checks cost no serving speed: `recommend`
p50 within 1.1x of the code before them. `bench/speed.py`'s recommend section needs the trained ML-100k
model; this needs none: it builds a model of the same shape (the ml100k config: bundled MiniLM encoder,
hidden 64, window 200, 2 user layers, 100 candidates, flat index) over 1,682 items with random item
vectors, which costs what a trained one costs, and times `recommend(history, k=10)` for fixed histories.
Each checkout serves from its own process (one torch thread); the driver alternates blocks of calls
between them (A B B A ...), so machine load hits both alike, and reports the p50 ratio per round.

    python bench/serving_ab.py --base /tmp/base              # /tmp/base: e.g. `git worktree add /tmp/base 55b4e98`
    python bench/serving_ab.py --base /tmp/base --rounds 8 --calls 400 --block 20

Writes bench/results/serving_ab.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import load_average, loadavg_text

ROOT = Path(__file__).resolve().parent.parent
NUM_ITEMS = 1682

WORKER = r"""
import json, sys, time, gc
import numpy as np, torch
torch.set_num_threads(1)
from llmrec import Recommender
import llmrec
folder, histories_file = sys.argv[1], sys.argv[2]
recommender = Recommender.from_pretrained(folder)
histories = json.loads(open(histories_file).read())
for history in histories[:20]:
    recommender.recommend(history, k=10)
print(json.dumps({"llmrec": llmrec.__file__}), flush=True)
call = 0
for line in sys.stdin:  # one block of timed calls per line received
    samples = []
    gc.collect(); gc.disable()
    for _ in range(int(line)):
        history = histories[call % len(histories)]
        call += 1
        start = time.perf_counter()
        recommender.recommend(history, k=10)
        samples.append(time.perf_counter() - start)
    gc.enable()
    print(json.dumps(samples), flush=True)
"""


def build_folder(folder: Path) -> None:
    """A ml100k-shaped model with random item vectors, saved by this checkout."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from llmrec import Recommender
    from llmrec.modeling import LlmRecModel
    from llmrec.training.pipeline import default_encoder_path

    torch.manual_seed(0)
    encoder = default_encoder_path()
    model = LlmRecModel.from_encoder(
        encoder, num_items=NUM_ITEMS, num_candidates=100, hidden_size=64, max_history_length=200, user_num_layers=2,
        user_num_heads=2, rerank_num_heads=2, dropout=0.3, max_text_length=64, similarity_temperature=0.05,
    )
    with torch.no_grad():
        model.item_text_embeddings[1:].normal_()
        model.warm_items[1:] = True
    ids = [str(n) for n in range(1, NUM_ITEMS + 1)]
    texts = [f"movie {n}" for n in ids]
    popularity = np.random.default_rng(0).integers(1, 500, NUM_ITEMS).astype(float)
    Recommender(model.eval(), AutoTokenizer.from_pretrained(encoder), ids, texts, popularity).save_pretrained(folder)


def model_and_histories_files(workdir: Path) -> tuple[Path, Path]:
    """The model folder under `workdir` (built the first time) and the file the histories go to: both A/B benchmarks'."""
    folder, histories_file = workdir / "model", workdir / "histories.json"
    if not (folder / "config.json").is_file():
        build_folder(folder)
    return folder, histories_file


def stop_workers(workers: dict[str, subprocess.Popen]) -> None:
    """End each worker's input, so it leaves its loop, and wait for it."""
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()


def histories(count: int = 200, seed: int = 0) -> list[list[str]]:
    """ML-100k-like history lengths (20 to 300 items), distinct items, fixed seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[str(item) for item in rng.choice(np.arange(1, NUM_ITEMS + 1), size=int(rng.integers(20, 300)), replace=False)]
            for _ in range(count)]


def start_worker(checkout: Path, folder: Path, histories_file: Path) -> subprocess.Popen:
    """A process serving from `checkout`'s llmrec; it times a block of calls per line it reads."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(histories_file)], env=env, cwd=checkout,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    imported = json.loads(worker.stdout.readline())["llmrec"]
    if not imported.startswith(str(checkout)):
        raise RuntimeError(f"worker imported {imported}, not the checkout {checkout}")
    return worker


def time_block(worker: subprocess.Popen, calls: int) -> list[float]:
    worker.stdin.write(f"{calls}\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="The reference checkout (e.g. a git worktree of main).")
    parser.add_argument("--rounds", type=int, default=6, help="Rounds; each runs both checkouts, order alternating.")
    parser.add_argument("--calls", type=int, default=400, help="Timed recommend calls per checkout per round.")
    parser.add_argument("--block", type=int, default=20, help="Calls per block; the checkouts alternate block by block.")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-serving-ab"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    folder, histories_file = model_and_histories_files(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    histories_file.write_text(json.dumps(histories()))
    checkouts = {"base": Path(args.base).resolve(), "this": ROOT}
    workers = {name: start_worker(checkout, folder, histories_file) for name, checkout in checkouts.items()}
    rounds = []
    try:
        for number in range(args.rounds):
            samples: dict[str, list[float]] = {"base": [], "this": []}
            load = load_average()[0]
            for block in range(args.calls // args.block):  # A B, B A, ...: blocks of calls alternate
                for name in ("base", "this") if block % 2 == 0 else ("this", "base"):
                    samples[name] += time_block(workers[name], args.block)
            p50 = {name: float(np.median(values) * 1e3) for name, values in samples.items()}
            rounds.append({**p50, "ratio": p50["this"] / p50["base"], "load1": load})
            print(f"round {number + 1}: base {p50['base']:.3f} ms, this {p50['this']:.3f} ms, ratio "
                  f"{rounds[-1]['ratio']:.3f} (load1 {load:.2f})", flush=True)
    finally:
        stop_workers(workers)
    ratios = [entry["ratio"] for entry in rounds]
    summary = {
        "base": str(checkouts["base"]), "this": str(ROOT), "calls_per_round": args.calls, "block": args.block, "rounds": rounds,
        "median_ratio": float(np.median(ratios)), "max_ratio": float(max(ratios)),
        "loadavg_end": loadavg_text(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    results = ROOT / "bench" / "results" / "serving_ab.json"
    results.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"median ratio this/base {summary['median_ratio']:.3f} (max {summary['max_ratio']:.3f}); "
          f"loadavg {summary['loadavg_end']}; written to {results}")


if __name__ == "__main__":
    main()
