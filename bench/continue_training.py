#!/usr/bin/env python
"""Keeping a model current: continue a trained model on new interactions (`--init_from`) vs a full retrain.

MovieLens-100k (the RecBole copy the default config reads) is cut by time at 90 % of its interactions
(stable sort by timestamp, file order within ties). Four runs of `scripts/finetune.py` with the default
config (configs/ml100k.yaml), each in its own process:

    base       the first 90 % of the interactions, catalogue = the items they touch
    retrain    everything (all interactions, all 1,682 items), from scratch
    continued  everything, `--init_from base`: old items keep their ids, new items get text vectors and
               new ID rows, training goes on from the base weights (early stopping as configured)
    stale      everything, `--init_from base` with 0 epochs: the base model with the new items added by
               text, evaluated as it is (what serving the old model would give)

retrain, continued and stale read the same files, so they have the same leave-one-out split of all the
data and are judged on the same test set: each of the 943 users' last interaction, full ranking over all
1,682 items with the user's history removed (the README's protocol). Wall and CPU seconds (the child
process's user + system time) and the load average around each run are recorded; the machine is shared,
so CPU seconds are the figure to compare.

    python bench/continue_training.py              # default epochs: over 40 min a run at load 6 on 2 cores
    python bench/continue_training.py --retrieval_epochs 8 --rerank_epochs 2   # every run shortened alike (the report says so)
    python bench/continue_training.py --reuse      # keep finished runs (their eval_results.json) and go on
    python bench/continue_training.py --extra "--training.cpu_threads 1"   # any override, passed to every run

Writes bench/results/continue_training.{json,md}; model folders and data go to runs/continue_training/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, git_commit, load_average, machine, markdown_table  # noqa: E402

WORK = ROOT / "runs" / "continue_training"
CUT = 0.9
RUN_ORDER = ("base", "continued", "stale", "retrain")  # the report is rewritten after each run


def write_data(folder: Path) -> dict[str, Any]:
    """items/interactions CSVs of all the data and of its first 90 % by time (texts rendered as the default config)."""
    sys.path.insert(0, str(ROOT))
    from llmrec.config import load_config
    from llmrec.data import load_interaction_data

    data = load_interaction_data(load_config(ROOT / "configs" / "ml100k.yaml").data)
    interactions = data.interactions.select_columns(["user_id", "item_id", "timestamp"]).to_pandas()
    items = data.items.select_columns(["item_id", "text"]).to_pandas()
    ordered = interactions.sort_values("timestamp", kind="stable")
    cut = int(round(CUT * len(ordered)))
    first = interactions.loc[sorted(ordered.index[:cut])]  # back in file order
    cut_time = float(ordered["timestamp"].iloc[cut - 1])
    first_items = set(first["item_id"])
    folder.mkdir(parents=True, exist_ok=True)
    interactions.to_csv(folder / "interactions_all.csv", index=False)
    first.to_csv(folder / "interactions_90.csv", index=False)
    for name, frame in (("items_all.csv", items), ("items_90.csv", items[items["item_id"].isin(first_items)])):
        frame.rename(columns={"text": "title"}).to_csv(folder / name, index=False, quoting=csv.QUOTE_ALL)
    later = interactions.loc[ordered.index[cut:]]
    return {
        "interactions": len(interactions), "interactions_first_90": len(first), "cut_timestamp": cut_time,
        "items": len(items), "items_first_90": len(first_items),
        "new_items": int(len(set(items["item_id"]) - first_items)),
        "new_items_interacted_after_cut": int(len(set(later["item_id"]) - first_items)),
        "users": int(interactions["user_id"].nunique()), "users_first_90": int(first["user_id"].nunique()),
        "new_users": int(interactions["user_id"].nunique() - first["user_id"].nunique()),
        "interactions_after_cut": len(later),
    }


def run_arguments(name: str, data_folder: Path, epochs: list[str]) -> list[str]:
    part = "90" if name == "base" else "all"
    arguments = [
        "--config", str(ROOT / "configs" / "ml100k.yaml"), "--output_dir", str(WORK / name),
        "--data.format=csv", f"--data.path={data_folder}", f"--data.interactions_file=interactions_{part}.csv",
        f"--data.items_file=items_{part}.csv", "--data.rating_column=null", "--data.item_text_template={title}",
        *epochs,
    ]
    if name in ("continued", "stale"):
        arguments += ["--init_from", str(WORK / "base")]
    if name == "stale":
        arguments += ["--training.retrieval_epochs=0", "--training.rerank_epochs=0"]
    return arguments


def run_one(name: str, data_folder: Path, epochs: list[str], timeout: int) -> dict[str, Any]:
    command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), *run_arguments(name, data_folder, epochs)]
    before_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = load_average()
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired as error:
        (WORK / f"{name}.log").write_text(error.stderr.decode() if isinstance(error.stderr, bytes) else (error.stderr or ""))
        raise SystemExit(f"{name} ran past --timeout {timeout} s; see {WORK / f'{name}.log'}.") from None
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    (WORK / f"{name}.log").write_text(completed.stderr)
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed (rc {completed.returncode}); see {WORK / f'{name}.log'}:\n{completed.stderr[-2000:]}")
    return {
        "command": " ".join(command[1:]), "wall_seconds": round(wall, 1),
        "cpu_seconds": round(usage.ru_utime - before_usage.ru_utime + usage.ru_stime - before_usage.ru_stime, 1),
        "load_average_before": load_before, "load_average_after": load_average(),
    }


def summarise(name: str, run: dict[str, Any]) -> dict[str, Any]:
    results = json.loads((WORK / name / "eval_results.json").read_text())
    timings = results["timings"]
    return {
        **run,
        "test": {system: {metric: results["test"][system][metric] for metric in ("ndcg@10", "hr@10", "ndcg@20", "hr@20")}
                 for system in ("popularity", "retrieval", "rerank")},
        "valid_ndcg@10": {system: results["valid"][system]["ndcg@10"] for system in ("retrieval", "rerank")},
        "best_valid_epochs": results["best_valid_epochs"],
        "timings": {key: round(value, 1) for key, value in timings.items()},
        "num_test_users": results["test"]["rerank"].get("num_users"),
    }


def write_markdown(report: dict[str, Any]) -> None:
    runs, data = report["runs"], report["data"]
    rows = []
    for name in RUN_ORDER:
        if name not in runs:
            continue
        run = runs[name]
        test = run["test"]
        rows.append([
            name, f"{test['retrieval']['ndcg@10']:.4f}", f"{test['retrieval']['hr@10']:.4f}",
            f"{test['rerank']['ndcg@10']:.4f}", f"{test['rerank']['hr@10']:.4f}",
            f"{run['best_valid_epochs']['retrieval']} / {run['best_valid_epochs']['rerank']}",
            run["wall_seconds"], run["cpu_seconds"], run["timings"].get("retrieval_training_seconds"),
            " ".join(f"{value:.1f}" for value in run["load_average_before"]),
        ])
    lines = [
        "# Continuing a trained model on new interactions vs retraining",
        "",
        f"Run {report['machine']['date']} on {report['machine']['cpu']} ({report['machine']['cores']} cores), code "
        f"{report['code']}, load average at start {report['machine']['load_average_at_start']} (shared machine; each "
        "run's load is in the table). " + (report["note"] + " " if report.get("note") else "") + "Default config (configs/ml100k.yaml)"
        + (f", overridden on every run: {' '.join(report['epoch_overrides'])}" if report["epoch_overrides"] else ", default epochs and early stopping")
        + ".",
        "",
        f"Data: MovieLens-100k, {data['interactions']:,} interactions, cut by time at 90 % "
        f"({data['interactions_first_90']:,} interactions up to timestamp {data['cut_timestamp']:.0f}; "
        f"{data['users_first_90']} users and {data['items_first_90']:,} items). The remaining "
        f"{data['interactions_after_cut']:,} interactions bring {data['new_users']} new users and {data['new_items']} new "
        "items.",
        "",
        "Test set (retrain, continued and stale alike): the leave-one-out split of all the data, i.e. each of the "
        f"{runs.get('retrain', runs.get('continued', {})).get('num_test_users', 943)} users' last interaction, ranked "
        f"against all {data['items']:,} items with the user's history removed. base's own row is on its own split of "
        "the first 90 % (its users' last interaction before the cut) and is not comparable with the others.",
        "",
        markdown_table(
            ["run", "retrieval NDCG@10", "retrieval HR@10", "rerank NDCG@10", "rerank HR@10", "best epoch (stage 1 / 2)",
             "wall s", "CPU s", "stage-1 s", "load before"],
            rows,
        ),
        "",
    ]
    if "continued" in runs and "retrain" in runs:
        continued, retrain = runs["continued"], runs["retrain"]
        lines += [
            f"continued vs retrain: rerank NDCG@10 {continued['test']['rerank']['ndcg@10'] - retrain['test']['rerank']['ndcg@10']:+.4f}, "
            f"retrieval NDCG@10 {continued['test']['retrieval']['ndcg@10'] - retrain['test']['retrieval']['ndcg@10']:+.4f}; "
            f"wall {continued['wall_seconds'] / retrain['wall_seconds']:.2f}x, CPU {continued['cpu_seconds'] / retrain['cpu_seconds']:.2f}x "
            "the retrain's.",
            "",
        ]
    (RESULTS / "continue_training.md").write_text("\n".join(lines))


def _records(reuse: bool) -> dict[str, Any]:
    """Finished runs: records/<name>.json (one file per run, so runs may go in parallel processes)."""
    records: dict[str, Any] = {}
    if reuse:
        for name in RUN_ORDER:
            path = WORK / "records" / f"{name}.json"
            if path.is_file() and (WORK / name / "eval_results.json").is_file():
                records[name] = json.loads(path.read_text())
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="Keep runs whose folder and record exist.")
    parser.add_argument("--only", nargs="*", choices=RUN_ORDER, help="Run only these (none: just write the report).")
    parser.add_argument("--retrieval_epochs", type=int, help="Stage-1 epochs of every run (default: the config's 60).")
    parser.add_argument("--rerank_epochs", type=int, help="Stage-2 epochs of every run (default: the config's 20).")
    parser.add_argument("--timeout", type=int, default=2400, help="Seconds per run.")
    parser.add_argument("--extra", default="", help="Overrides passed to every run, e.g. \"--training.cpu_threads 1\".")
    parser.add_argument("--note", default="", help="A sentence for the report (e.g. which runs shared the machine).")
    arguments = parser.parse_args()
    arguments.epochs = [f"--training.{stage}_epochs={value}" for stage, value in
                        (("retrieval", arguments.retrieval_epochs), ("rerank", arguments.rerank_epochs)) if value is not None]
    arguments.epochs += shlex.split(arguments.extra)
    (WORK / "records").mkdir(parents=True, exist_ok=True)
    records = _records(arguments.reuse)
    data_folder = WORK / "data"
    if arguments.reuse and (data_folder / "summary.json").is_file():
        data_summary = json.loads((data_folder / "summary.json").read_text())
    else:
        data_summary = write_data(data_folder)
        (data_folder / "summary.json").write_text(json.dumps(data_summary, indent=2))
    report = {"machine": machine(), "code": git_commit(), "epoch_overrides": arguments.epochs, "note": arguments.note,
              "data": data_summary, "runs": {}}
    wanted = RUN_ORDER if arguments.only is None else arguments.only
    for name in RUN_ORDER:
        if name in wanted and name not in records:
            print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
            records[name] = run_one(name, data_folder, arguments.epochs, arguments.timeout)
            (WORK / "records" / f"{name}.json").write_text(json.dumps(records[name], indent=2))
        records.update({other: record for other, record in _records(True).items() if other not in records})
        report["runs"] = {run: summarise(run, records[run]) for run in RUN_ORDER if run in records}
        if name in report["runs"]:
            print(f"{time.strftime('%H:%M:%S')} {name}: {json.dumps(report['runs'][name]['test']['rerank'])} "
                  f"wall {records[name]['wall_seconds']} s", flush=True)
        report["load_average_at_end"] = load_average()
        (RESULTS / "continue_training.json").write_text(json.dumps(report, indent=2))
        write_markdown(report)


if __name__ == "__main__":
    main()
