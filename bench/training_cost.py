#!/usr/bin/env python
"""Stage-1 training cost: does an epoch cost what its interactions cost, or what the window pads them to?

Times stage-1 epochs of the default model (configs/ml100k.yaml's model and training settings) on the
leave-one-out training sequences of MovieLens-100k, ML-1M and Amazon Beauty (window 200, and window 50 on
Beauty), and gives per-interaction cost as a ratio against MovieLens-100k's, measured in the same run.
With --baseline CHECKOUT the same cases run on another checkout of llmrec too (e.g. the commit before
length-grouped batches), so the table has before / after.

Each case runs in its own process with PYTHONPATH set to the checkout under test, so either code version
imports its own `llmrec`; cases alternate (ABBA order over repeats), since the machine may be shared, and
the load average is recorded around each. Only training is timed: validation is switched off, and the
item text embeddings are random numbers of the right shape instead of the encoder's (stage 1 trains on
that cache with a frozen encoder, so its values do not change the cost). ML-1M is measured on a fixed
random subset of its users (--ml1m-users, the whole catalogue kept) and reported per interaction.

    python bench/training_cost.py                                   # this checkout only
    git worktree add /tmp/lb-base 55b4e98
    python bench/training_cost.py --baseline /tmp/lb-base --repeats 2   # the committed results

Writes bench/results/training_cost.json (every epoch time, load, threads) and .md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {  # name -> data settings over llmrec's own config (null path = the bundled MovieLens-100k)
    "ml100k": None,
    "ml1m": {"path": "ml-1m", "format": "sequences", "item_text_template": "{title}. Genres: {genres}"},
    "amazon-beauty": {"path": "amazon-beauty", "format": "sequences", "item_text_template": "{title}"},
}
CASES = (("ml100k", 200), ("ml1m", 200), ("amazon-beauty", 200), ("amazon-beauty", 50))
DEFAULT_CONFIG = "configs/ml100k.yaml"  # the default model and training settings


# ----- worker: one case, in a process that imports the llmrec under test -----------------------------


def run_worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    sys.path.insert(0, spec["code"])
    import torch

    torch.set_num_threads(spec["threads"])
    from accelerate import Accelerator

    from llmrec.config import load_config
    from llmrec.data import EvaluationExamples, SequentialSplit
    from llmrec.modeling import LlmRecModel
    from llmrec.training.pipeline import default_encoder_path
    from llmrec.training.trainer import LlmRecTrainer

    data = json.loads(Path(spec["data"]).read_text())
    with tempfile.TemporaryDirectory() as output_dir:
        config = load_config(Path(spec["code"]) / DEFAULT_CONFIG, {
            "output_dir": output_dir, "model": {"max_history_length": spec["window"]},
            "training": {"retrieval_epochs": spec["epochs"], "cpu_threads": spec["threads"], "early_stopping_patience": 0},
        })
        num_items = data["num_items"]
        split = SequentialSplit([str(item) for item in range(1, num_items + 1)], [""] * num_items,
                                [str(user) for user in range(len(data["train_sequences"]))], data["train_sequences"],
                                EvaluationExamples(), EvaluationExamples())
        accelerator = Accelerator()
        settings = {name: value for name, value in vars(config.model).items() if name not in ("encoder", "use_user_profiles")}
        model = LlmRecModel.from_encoder(default_encoder_path(), num_items=num_items,
                                         num_candidates=config.retrieval.num_candidates, **settings).to(accelerator.device)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # stands in for the encoder's cache: same shape, and values do not change the cost
            model.item_text_embeddings.copy_(torch.randn(model.item_text_embeddings.shape, generator=generator))
        model.warm_items.copy_(torch.as_tensor(split.item_popularity() > 0))
        trainer = LlmRecTrainer(model, split, config, accelerator, tokenized_items={})
        record = _instrument(trainer)
        load_before = os.getloadavg()[0]
        trainer.train_retrieval()
        marks = record["marks"]
        print(json.dumps({
            "epoch_seconds": [end - start for start, end in zip(marks[0::2], marks[1::2])],
            "steps_per_epoch": record["steps"], "loss": trainer.loss_type, "threads": torch.get_num_threads(),
            "device": str(accelerator.device), "load_1min": [load_before, os.getloadavg()[0]],
        }))


def _instrument(trainer: Any) -> dict[str, Any]:
    """Validation off, and a clock mark where each epoch's training starts and ends (both code versions)."""
    record: dict[str, Any] = {"marks": [], "steps": None}
    trainer.evaluate_retrieval_valid = lambda: {"ndcg@10": 0.0}
    fit, start_stage, end_epoch = trainer._fit, trainer._start_stage, trainer._end_epoch

    def timed_fit(stage, loader, *args):
        record["steps"] = len(loader)
        return fit(stage, loader, *args)

    def timed_start(*args):
        started = start_stage(*args)
        record["marks"].append(time.perf_counter())
        return started

    def timed_end(*args):
        record["marks"].append(time.perf_counter())
        result = end_epoch(*args)
        record["marks"].append(time.perf_counter())  # the next epoch starts after the bookkeeping
        return result

    trainer._fit, trainer._start_stage, trainer._end_epoch = timed_fit, timed_start, timed_end
    return record


# ----- parent: data, schedule, tables ------------------------------------------------------------------


def prepare_data(name: str, data_root: Path, folder: Path, ml1m_users: int) -> dict[str, Any]:
    """The data set's leave-one-out training sequences through llmrec's own loader, saved for the workers."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from llmrec.config import load_config
    from llmrec.data import build_split, load_interaction_data

    overrides = {} if DATASETS[name] is None else {"data": {**DATASETS[name], "path": str(data_root / DATASETS[name]["path"])}}
    config = load_config(ROOT / DEFAULT_CONFIG, overrides)
    split = build_split(load_interaction_data(config.data), config.data)
    sequences = split.train_sequences
    note = "all users"
    if name == "ml1m" and ml1m_users and ml1m_users < len(sequences):
        chosen = np.sort(np.random.default_rng(0).choice(len(sequences), size=ml1m_users, replace=False))
        sequences = [sequences[user] for user in chosen]
        note = f"{ml1m_users} of {len(split.train_sequences)} users (fixed random subset), whole catalogue"
    lengths = [len(sequence) for sequence in sequences]
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"num_items": split.num_items, "train_sequences": sequences}))
    return {"path": str(path), "num_items": split.num_items, "users": len(sequences), "interactions": sum(lengths),
            "median_history": statistics.median(lengths), "max_history": max(lengths), "subset": note}


def run_case(code: Path, data: dict[str, Any], window: int, epochs: int, threads: int, folder: Path) -> dict[str, Any]:
    from common import load_average

    spec = folder / "spec.json"
    spec.write_text(json.dumps({"code": str(code), "data": data["path"], "window": window, "epochs": epochs,
                                "threads": threads}))
    environment = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    load_before = load_average()
    finished = subprocess.run([sys.executable, __file__, "--worker", str(spec)], env=environment, capture_output=True,
                              text=True, cwd=str(code))
    if finished.returncode != 0:
        raise SystemExit(f"worker failed on {code} ({data['path']}, window {window}):\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    return {**result, "load_average_before": load_before, "load_average_after": load_average()}


def summarise(runs: list[dict[str, Any]], data: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (code, data set, window): the median epoch time after the first epoch of each run (warm)."""
    summary: dict[str, dict[str, Any]] = {}
    for run in runs:
        key = f"{run['code']}|{run['dataset']}|{run['window']}"
        entry = summary.setdefault(key, {"code": run["code"], "dataset": run["dataset"], "window": run["window"],
                                         "warm_epoch_seconds": [], "steps_per_epoch": run["steps_per_epoch"],
                                         "loss": run["loss"]})
        entry["warm_epoch_seconds"] += run["epoch_seconds"][1:] or run["epoch_seconds"]
    for entry in summary.values():
        entry["seconds_per_epoch"] = statistics.median(entry["warm_epoch_seconds"])
        entry["microseconds_per_interaction"] = 1e6 * entry["seconds_per_epoch"] / data[entry["dataset"]]["interactions"]
    for entry in summary.values():
        reference = summary.get(f"{entry['code']}|ml100k|200")
        if reference:
            entry["per_interaction_vs_ml100k"] = entry["microseconds_per_interaction"] / reference["microseconds_per_interaction"]
        if entry["dataset"] == "amazon-beauty" and entry["window"] == 200 and f"{entry['code']}|amazon-beauty|50" in summary:
            entry["window_200_vs_50"] = entry["seconds_per_epoch"] / summary[f"{entry['code']}|amazon-beauty|50"]["seconds_per_epoch"]
    return summary


def render(results: dict[str, Any]) -> str:
    from common import markdown_table

    summary, data = results["summary"], results["data"]
    rows = []
    for entry in sorted(summary.values(), key=lambda e: (e["code"] != "after", CASES.index((e["dataset"], e["window"])))):
        rows.append([
            entry["code"], entry["dataset"], entry["window"], f"{data[entry['dataset']]['interactions']:,}",
            entry["steps_per_epoch"], f"{entry['seconds_per_epoch']:.1f}", f"{entry['microseconds_per_interaction']:.1f}",
            f"{entry.get('per_interaction_vs_ml100k', float('nan')):.2f}x",
            f"{entry['window_200_vs_50']:.2f}x" if "window_200_vs_50" in entry else "",
            " ".join(f"{seconds:.1f}" for seconds in entry["warm_epoch_seconds"]),
        ])
    table = markdown_table(
        ["code", "data set", "window", "training interactions", "steps / epoch", "s / epoch", "µs / interaction",
         "per interaction vs ml100k", "window 200 vs 50", "warm epochs (s)"], rows)
    targets = ["Targets (issue 14): window 200 within 1.1x of window 50 on amazon-beauty; per interaction at most "
               "1.5x ml100k's on ml1m and 2x on amazon-beauty."]
    for entry in summary.values():
        if entry["code"] != "after":
            continue
        if "window_200_vs_50" in entry:
            targets.append(f"- amazon-beauty window 200 vs 50: {entry['window_200_vs_50']:.2f}x "
                           f"({'met' if entry['window_200_vs_50'] <= 1.1 else 'missed'})")
        limit = {"ml1m": 1.5, "amazon-beauty": 2.0}.get(entry["dataset"])
        if limit and entry["window"] == 200:
            ratio = entry["per_interaction_vs_ml100k"]
            targets.append(f"- {entry['dataset']} per interaction vs ml100k: {ratio:.2f}x ({'met' if ratio <= limit else 'missed'})")
    data_rows = [[name, f"{info['users']:,}", f"{info['num_items']:,}", f"{info['interactions']:,}", info["median_history"],
                  info["max_history"], info["subset"]] for name, info in data.items()]
    machine = results["machine"]
    return "\n\n".join([
        "# Stage-1 training cost per epoch",
        f"Run {machine['date']} on {machine['cpu']} ({machine['cores']} cores, {results['threads']} torch threads), "
        f"load average at start {machine['load_average_at_start']} (shared machine: other jobs ran meanwhile; each "
        "run's load is in training_cost.json). Codes: " + ", ".join(f"{name} = {commit}" for name, commit in results["codes"].items())
        + f". {results['repeats']} interleaved repeats of {results['epochs']} epochs each; s / epoch is the median of the "
        "warm epochs (all but each run's first). Training only: no validation, random item text embeddings.",
        table, "\n".join(targets), "Training data (leave-one-out training sequences):",
        markdown_table(["data set", "users", "items", "training interactions", "median history", "max history", "users timed"], data_rows),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", type=Path, help="another llmrec checkout to time as 'before'")
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding ml-1m/ and amazon-beauty/")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="per run; the first is warm-up")
    parser.add_argument("--ml1m-users", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.worker is not None:
        return run_worker(args.worker)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import git_commit, machine, write_results

    data_root = args.data_root or next((path for path in (ROOT.parent / "shared" / "data", Path("/work/shared/data"))
                                        if path.is_dir()), ROOT.parent / "shared" / "data")
    names = [name for name in args.datasets.split(",") if name]
    codes = {"after": ROOT, **({"before": args.baseline.resolve()} if args.baseline else {})}
    cases = [(name, window) for name, window in CASES if name in names]
    started = machine()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        data = {name: prepare_data(name, data_root, folder, args.ml1m_users) for name in names}
        schedule = [(code, case) for case in cases for code in codes]
        runs = []
        for repeat in range(args.repeats):
            for code, (name, window) in schedule if repeat % 2 == 0 else schedule[::-1]:  # ABBA
                run = run_case(codes[code], data[name], window, args.epochs, args.threads, folder)
                runs.append({"code": code, "dataset": name, "window": window, "repeat": repeat, **run})
                print(f"{code:6} {name:14} window {window:3}: epochs {[round(s, 1) for s in run['epoch_seconds']]} s, "
                      f"{run['steps_per_epoch']} steps, load {run['load_average_before'][0]:.1f}", flush=True)
    for info in data.values():
        info.pop("path")
    results = {"machine": started, "threads": args.threads, "repeats": args.repeats, "epochs": args.epochs,
               "codes": {name: git_commit(path) for name, path in codes.items()}, "data": data, "runs": runs,
               "summary": summarise(runs, data)}
    results["machine"]["load_average_at_end"] = __import__("common").load_average()
    json_path, markdown_path = write_results("training_cost", results, render(results))
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
