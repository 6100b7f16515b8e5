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
that cache with a frozen encoder, so its values do not change the cost). ML-1M and Amazon Beauty are
timed on a fixed random subset of their users (--max-users, the whole catalogue kept), so the figures to
compare are per training interaction; the whole-epoch time is extrapolated from them.

    python bench/training_cost.py                                   # this checkout only
    git worktree add /tmp/lb-base 55b4e98
    python bench/training_cost.py --baseline /tmp/lb-base     # the committed results (before / after)

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
DATASETS = {  # name -> its config (data section only; model and training stay the defaults)
    "ml100k": "configs/ml100k.yaml", "ml1m": "configs/ml1m.yaml", "amazon-beauty": "configs/amazon_beauty.yaml",
}
CASES = (("ml100k", 200, "auto"), ("ml1m", 200, "auto"), ("amazon-beauty", 200, "auto"), ("amazon-beauty", 50, "auto"))
# --sampled: where the catalogue's full softmax, not padding, sets the cost (this checkout only)
SAMPLED_CASES = (("amazon-beauty", 200, "sampled_softmax"), ("ml1m", 200, "sampled_softmax"))
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

    from llmrec.config import TrainingSettings

    data = json.loads(Path(spec["data"]).read_text())
    training = {"retrieval_epochs": spec["epochs"], "cpu_threads": spec["threads"], "early_stopping_patience": 0,
                "loss": spec["loss"]}
    if "group_by_length" in TrainingSettings.__dataclass_fields__:  # what is measured; older checkouts lack the key
        training["group_by_length"] = True
    with tempfile.TemporaryDirectory() as output_dir:
        config = load_config(Path(spec["code"]) / DEFAULT_CONFIG, {
            "output_dir": output_dir, "model": {"max_history_length": spec["window"]}, "training": training,
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
            "epoch_seconds": [end[0] - start[0] for start, end in zip(marks[0::2], marks[1::2])],
            "epoch_cpu_seconds": [end[1] - start[1] for start, end in zip(marks[0::2], marks[1::2])],
            "steps_per_epoch": record["steps"], "loss": trainer.loss_type, "threads": torch.get_num_threads(),
            "device": str(accelerator.device), "load_1min": [load_before, os.getloadavg()[0]],
        }))


def _instrument(trainer: Any) -> dict[str, Any]:
    """Validation off, and clock marks (wall, this process's CPU) where each epoch's training starts and ends."""
    record: dict[str, Any] = {"marks": [], "steps": None}
    trainer.evaluate_retrieval_valid = lambda: {"ndcg@10": 0.0}
    fit, start_stage, end_epoch = trainer._fit, trainer._start_stage, trainer._end_epoch

    def timed_fit(stage, loader, *args):
        record["steps"] = len(loader)
        return fit(stage, loader, *args)

    def timed_start(*args):
        started = start_stage(*args)
        record["marks"].append((time.perf_counter(), time.process_time()))
        return started

    def timed_end(*args):
        record["marks"].append((time.perf_counter(), time.process_time()))
        result = end_epoch(*args)
        record["marks"].append((time.perf_counter(), time.process_time()))  # the next epoch starts after the bookkeeping
        return result

    trainer._fit, trainer._start_stage, trainer._end_epoch = timed_fit, timed_start, timed_end
    return record


# ----- parent: data, schedule, tables ------------------------------------------------------------------


def prepare_data(name: str, data_root: Path, folder: Path, max_users: int) -> dict[str, Any]:
    """The data set's leave-one-out training sequences through llmrec's own loader, saved for the workers."""
    import numpy as np
    import yaml

    sys.path.insert(0, str(ROOT))
    from llmrec.config import load_config
    from llmrec.data import build_split, load_interaction_data

    data_settings = yaml.safe_load((ROOT / DATASETS[name]).read_text())["data"]
    if data_settings.get("path"):  # the shared data folder, wherever this checkout is
        data_settings["path"] = str(data_root / Path(data_settings["path"]).name)
    config = load_config(ROOT / DEFAULT_CONFIG, {"data": data_settings})
    split = build_split(load_interaction_data(config.data), config.data)
    sequences = split.train_sequences
    note = "all"
    if max_users and max_users < len(sequences):
        chosen = np.sort(np.random.default_rng(0).choice(len(sequences), size=max_users, replace=False))
        sequences = [sequences[user] for user in chosen]
        note = f"{max_users:,} of {len(split.train_sequences):,} (fixed random subset; whole catalogue)"
    lengths = [len(sequence) for sequence in sequences]
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"num_items": split.num_items, "train_sequences": sequences}))
    return {"path": str(path), "num_items": split.num_items, "users": len(sequences), "interactions": sum(lengths),
            "all_users_interactions": sum(len(sequence) for sequence in split.train_sequences),
            "median_history": statistics.median(lengths), "max_history": max(lengths), "users_timed": note}


def run_case(code: Path, data: dict[str, Any], case: tuple[str, int, str], epochs: int, threads: int, folder: Path) -> dict[str, Any]:
    from common import load_average

    spec = folder / "spec.json"
    _, window, loss = case
    spec.write_text(json.dumps({"code": str(code), "data": data["path"], "window": window, "loss": loss,
                                "epochs": epochs, "threads": threads}))
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
        key = f"{run['code']}|{run['dataset']}|{run['window']}|{run['loss']}"
        entry = summary.setdefault(key, {"code": run["code"], "dataset": run["dataset"], "window": run["window"],
                                         "warm_epoch_seconds": [], "warm_epoch_cpu_seconds": [],
                                         "steps_per_epoch": run["steps_per_epoch"], "loss": run["loss"]})
        entry["warm_epoch_seconds"] += run["epoch_seconds"][1:] or run["epoch_seconds"]
        cpu = run.get("epoch_cpu_seconds") or []
        entry["warm_epoch_cpu_seconds"] += cpu[1:] or cpu
    for entry in summary.values():
        interactions = data[entry["dataset"]]["interactions"]
        entry["seconds_per_epoch"] = statistics.median(entry["warm_epoch_seconds"])
        entry["microseconds_per_interaction"] = 1e6 * entry["seconds_per_epoch"] / interactions
        if entry["warm_epoch_cpu_seconds"]:
            entry["cpu_seconds_per_epoch"] = statistics.median(entry["warm_epoch_cpu_seconds"])
            entry["cpu_microseconds_per_interaction"] = 1e6 * entry["cpu_seconds_per_epoch"] / interactions
    # Ratios on CPU seconds where measured: on a shared machine they move far less with the load than wall time.
    for entry in summary.values():
        unit = "cpu_microseconds_per_interaction" if "cpu_seconds_per_epoch" in entry else "microseconds_per_interaction"
        reference = summary.get(f"{entry['code']}|ml100k|200|full_softmax")
        if reference and unit in reference:
            entry["per_interaction_vs_ml100k"] = entry[unit] / reference[unit]
        narrow = summary.get(f"{entry['code']}|{entry['dataset']}|50|{entry['loss']}")
        if entry["window"] == 200 and narrow and unit in narrow:
            entry["window_200_vs_50"] = entry[unit] / narrow[unit]
    return summary


def entry_seconds(summary: dict[str, dict[str, Any]], name: str) -> float:
    """Seconds per training interaction of this checkout at window 200 (for a whole-epoch estimate)."""
    entry = summary.get(f"after|{name}|200|full_softmax")
    return entry["microseconds_per_interaction"] / 1e6 if entry else float("nan")


def render(results: dict[str, Any]) -> str:
    from common import markdown_table

    summary, data = results["summary"], results["data"]
    rows = []
    order = [case[:2] for case in CASES + SAMPLED_CASES]
    for entry in sorted(summary.values(), key=lambda e: (e["code"] != "after", order.index((e["dataset"], e["window"])), e["loss"])):
        rows.append([
            entry["code"], entry["dataset"], entry["window"], entry["loss"], f"{data[entry['dataset']]['interactions']:,}",
            entry["steps_per_epoch"], f"{entry['seconds_per_epoch']:.1f}",
            f"{entry['cpu_seconds_per_epoch']:.1f}" if "cpu_seconds_per_epoch" in entry else "",
            f"{entry.get('cpu_microseconds_per_interaction', entry['microseconds_per_interaction']):.1f}",
            f"{entry.get('per_interaction_vs_ml100k', float('nan')):.2f}x",
            f"{entry['window_200_vs_50']:.2f}x" if "window_200_vs_50" in entry else "",
            " ".join(f"{seconds:.1f}" for seconds in entry["warm_epoch_seconds"]),
        ])
    table = markdown_table(
        ["code", "data set", "window", "loss", "training interactions timed", "steps / epoch", "wall s / epoch", "CPU s / epoch",
         "µs / interaction (CPU where measured)",
         "per interaction vs ml100k", "window 200 vs 50", "warm epochs (s)"], rows)
    targets = ["Targets (issue 14): window 200 within 1.1x of window 50 on amazon-beauty; per interaction at most "
               "1.5x ml100k's on ml1m and 2x on amazon-beauty."]
    for entry in summary.values():
        if entry["code"] != "after" or entry["loss"] != "full_softmax":
            continue
        if "window_200_vs_50" in entry:
            targets.append(f"- amazon-beauty window 200 vs 50: {entry['window_200_vs_50']:.2f}x "
                           f"({'met' if entry['window_200_vs_50'] <= 1.1 else 'missed'})")
        limit = {"ml1m": 1.5, "amazon-beauty": 2.0}.get(entry["dataset"])
        if limit and entry["window"] == 200:
            ratio = entry["per_interaction_vs_ml100k"]
            targets.append(f"- {entry['dataset']} per interaction vs ml100k: {ratio:.2f}x ({'met' if ratio <= limit else 'missed'})")
    data_rows = [[name, f"{info['users']:,}", f"{info['num_items']:,}", f"{info['interactions']:,}", info["median_history"],
                  info["max_history"], info["users_timed"], f"{info['all_users_interactions'] * entry_seconds(summary, name):.0f}"]
                 for name, info in data.items()]
    machine = results["machine"]
    return "\n\n".join([
        "# Stage-1 training cost per epoch",
        f"Run {machine['date']} on {machine['cpu']} ({machine['cores']} cores, {results['threads']} torch threads), "
        f"load average at start {machine['load_average_at_start']} (shared machine: other jobs ran meanwhile; each "
        "run's load is in training_cost.json). Codes: " + ", ".join(f"{name} = {commit}" for name, commit in results["codes"].items())
        + f". {results['repeats']} interleaved repeat(s) of {results['epochs']} epoch(s) each; s / epoch is the median over "
        "repeats (of all epochs but each run's first when a run has more than one). Wall seconds follow the machine's "
        "load; CPU seconds (the worker's user + system time, all its threads) much less, so the per-interaction figures "
        "and the ratios are on CPU seconds where a run measured them. Training only: no validation, random "
        "item text embeddings. Big data sets are timed on a fixed random subset of their users (whole catalogue) and "
        "compared per training interaction.",
        *([results["note"]] if results.get("note") else []),
        table, "\n".join(targets), "Training data (leave-one-out training sequences):",
        markdown_table(["data set", "users", "items", "training interactions timed", "median history", "max history",
                        "users timed", "whole epoch, after, window 200 (wall s at this run's load, extrapolated)"], data_rows),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", type=Path, help="another llmrec checkout to time as 'before'")
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding ml-1m/ and amazon-beauty/")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="per run; with more, the first is left out as warm-up")
    parser.add_argument("--max-users", default="ml1m=800,amazon-beauty=8000",
                        help="per data set, a fixed random subset of users to time (cost is reported per interaction)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sampled", action="store_true", help="also time this checkout with training.loss sampled_softmax")
    parser.add_argument("--cases", help="only these, e.g. ml100k:200:auto,amazon-beauty:200:sampled_softmax")
    parser.add_argument("--name", default="training_cost", help="results file name in bench/results")
    parser.add_argument("--rerender", action="store_true", help="rewrite the tables of bench/results/<name>.json; run nothing")
    args = parser.parse_args()
    if args.worker is not None:
        return run_worker(args.worker)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, git_commit, machine, write_results

    if args.rerender:  # the tables again from a results file (e.g. after a change to them)
        results = json.loads((RESULTS / f"{args.name}.json").read_text())
        results["summary"] = summarise(results["runs"], results["data"])
        write_results(args.name, results, render(results))
        return None

    data_root = args.data_root or next((path for path in (ROOT.parent / "shared" / "data", Path("/work/shared/data"))
                                        if path.is_dir()), ROOT.parent / "shared" / "data")
    names = [name for name in args.datasets.split(",") if name]
    codes = {"after": ROOT, **({"before": args.baseline.resolve()} if args.baseline else {})}
    cases = [case for case in CASES if case[0] in names]
    extra_cases = [case for case in SAMPLED_CASES if args.sampled and case[0] in names]
    if args.cases:
        wanted = {(name, int(window), loss) for name, window, loss in (item.split(":") for item in args.cases.split(","))}
        cases, extra_cases = [case for case in cases if case in wanted], [case for case in extra_cases if case in wanted]
    started = machine()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        max_users = {name: int(count) for name, count in (item.split("=") for item in args.max_users.split(",") if item)}
        data = {name: prepare_data(name, data_root, folder, max_users.get(name, 0)) for name in names}
        schedule = [(code, case) for case in cases for code in codes]
        schedule += [("after", case) for case in extra_cases]
        runs = []
        for repeat in range(args.repeats):
            for code, case in schedule if repeat % 2 == 0 else schedule[::-1]:  # ABBA
                name, window, _ = case
                run = run_case(codes[code], data[name], case, args.epochs, args.threads, folder)
                runs.append({"code": code, "dataset": name, "window": window, "repeat": repeat, **run})
                print(f"{code:6} {name:14} window {window:3} {run['loss']}: epochs {[round(s, 1) for s in run['epoch_seconds']]} s, "
                      f"{run['steps_per_epoch']} steps, load {run['load_average_before'][0]:.1f}", flush=True)
    for info in data.values():
        info.pop("path")
    results = {"machine": started, "threads": args.threads, "repeats": args.repeats, "epochs": args.epochs,
               "codes": {name: git_commit(path) for name, path in codes.items()}, "data": data, "runs": runs,
               "summary": summarise(runs, data)}
    results["machine"]["load_average_at_end"] = __import__("common").load_average()
    json_path, markdown_path = write_results(args.name, results, render(results))
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
