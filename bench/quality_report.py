"""bench/quality.py's table: per-seed results summarised as mean ± sample std, written as markdown."""

from __future__ import annotations

from typing import Optional

import numpy as np

from common import table_header, table_row
from quality_systems import DATASETS, LEARNED_SYSTEMS, METRICS, ROWS


def _train_seconds(run: dict, stage: str) -> float:
    """Wall time to a usable model for this row: data, catalogue encoding, stage 1, and stage 2 for rerank."""
    timings = run["timings"]
    seconds = timings["data_seconds"] + timings["item_encoding_seconds"] + timings["retrieval_training_seconds"]
    return seconds + (timings.get("rerank_training_seconds", 0.0) if stage == "rerank" else 0.0)


def _summary(values: list[Optional[float]]) -> dict:
    values = [value for value in values if value is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def _rows(results: dict) -> list[dict]:
    """One entry per table row: per-seed values and mean / sample std over seeds (a single value for baselines)."""
    rows = []
    for label, system, stage in ROWS:
        entry = results["systems"].get(system)
        if entry is None:
            continue
        if stage is None:
            per_seed = [{"seed": None, "test": entry["test"], "valid": entry["valid"],
                         "train_seconds": entry["train_seconds"], "peak_rss_mb": None}]
        else:
            per_seed = [{"seed": run["seed"], "test": run["test"][stage], "valid": run["valid"][stage],
                         "train_seconds": _train_seconds(run, stage), "peak_rss_mb": run["subprocess"]["peak_rss_mb"],
                         "best_valid_epoch": run["best_valid_epochs"][stage]} for run in entry["runs"]]
        if not per_seed:
            continue
        summary = {f"test {metric}": _summary([seed["test"].get(metric) for seed in per_seed]) for metric in METRICS}
        summary.update({f"valid {metric}": _summary([seed["valid"].get(metric) for seed in per_seed]) for metric in METRICS})
        summary["train_seconds"] = _summary([seed["train_seconds"] for seed in per_seed])
        summary["peak_rss_mb"] = _summary([seed["peak_rss_mb"] for seed in per_seed])
        rows.append({"label": label, "system": system, "stage": stage, "per_seed": per_seed, "summary": summary})
    return rows


def _cell(summary: dict, digits: int = 4) -> str:
    if summary["n"] == 0:
        return "–"
    if summary["n"] == 1:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _duration(seconds: dict) -> str:
    if seconds["mean"] < 60:
        return _cell(seconds, 2) + " s"
    return _cell({**seconds, "mean": seconds["mean"] / 60, "std": seconds["std"] / 60}, 1) + " min"


def render_table(results: dict) -> str:
    header = ["system (test)", "HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "HR@100", "valid NDCG@10", "seeds",
              "train time", "peak RSS (MB)"]
    lines = table_header(header)
    for row in results["rows"]:
        summary = row["summary"]
        seconds = summary["train_seconds"]
        cells = [row["label"], *(_cell(summary[f"test {metric}"]) for metric in METRICS), _cell(summary["valid ndcg@10"]),
                 ", ".join(str(seed["seed"]) for seed in row["per_seed"]) if row["stage"] else "–",
                 _duration(seconds), _cell(summary["peak_rss_mb"], 0)]
        lines.append(table_row(cells))
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    machine, run = results["machine"], results["run"]
    knn = results["systems"].get("itemknn", {}).get("chosen")
    dataset = DATASETS[results.get("dataset", "ml100k")]
    notes = [
        f"{results['protocol']['data']}; config `{results.get('config', dataset.config)}`. Leave-one-out "
        f"(last = test, second last = valid), full ranking over {results['protocol']['num_items']:,} items with "
        f"each user's history removed, {results['protocol']['test_users']:,} test users. Learned systems: mean ± "
        "sample std over the seeds listed; popularity and ItemKNN are deterministic. Hybrid retrieval and "
        "retrieval + rerank are the same runs. HR@100 of hybrid retrieval is the candidate recall@100: the share of "
        "test targets among the 100 FAISS candidates the head reranks (so rerank's HR@100 equals it).",
        dataset.published,
        "Train time: data + catalogue encoding + stage 1 (+ stage 2 for rerank) from each run's `eval_results.json`; "
        "peak RSS of the training process.",
    ]
    loads = [value for system in LEARNED_SYSTEMS for seed_run in results["systems"].get(system, {}).get("runs", [])
             for value in (seed_run["subprocess"].get("load_average_1min") or {}).values()]
    if loads:
        notes[-1] += (f" Wall times depend on what else runs: the 1-minute load average sampled at the start and end "
                      f"of the training runs was {min(loads):.1f}–{max(loads):.1f} on {machine['cpu_cores']} cores "
                      "(CPU seconds per run are in the JSON).")
    runs_by_system = {system: results["systems"][system]["runs"] for system in LEARNED_SYSTEMS
                      if results["systems"].get(system, {}).get("runs")}
    if runs_by_system:
        notes.append("Training runs (`scripts/finetune.py`, default config): " + "; ".join(
            f"{system}: code {', '.join(sorted({str(seed_run['subprocess']['commit']) for seed_run in runs}))}, "
            f"training.cpu_threads {', '.join(sorted({str(seed_run['cpu_threads'] or 'null') for seed_run in runs}))}"
            for system, runs in runs_by_system.items()
        ) + " (null = both cores).")
    if knn:
        neighbors = knn["num_neighbors"] or "all"
        notes.append(f"ItemKNN: {neighbors} neighbours, shrinkage {knn['shrinkage']:g}, chosen on valid NDCG@10.")
    if run["extra_overrides"]:
        notes.append(f"Extra overrides on every training run: `{run['extra_overrides']}`.")
    notes.append(f"{machine['cpu_model']}, {machine['cpu_cores']} cores, torch {machine['torch']}, "
                 f"Python {machine['python']}; finished {run['finished']}; "
                 f"`{run['command']}`.")
    title = dataset.description.split(" (")[0].split(",")[0]
    return f"# Quality on {title}\n\n" + render_table(results) + "\n\n" + "\n\n".join(notes) + "\n"
