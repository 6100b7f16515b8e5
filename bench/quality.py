"""Quality benchmark: popularity, ItemKNN, ID-only, text-only and hybrid llmrec, one protocol, on a data set.

`--dataset` picks the data set and its default config: ml100k (MovieLens-100k from the RecBole wheel,
`configs/ml100k.yaml`), ml1m or amazon-beauty (the sequence files in `../shared/data`, `configs/ml1m.yaml`,
`configs/amazon_beauty.yaml`). Each table carries the published full-ranking figures for its data set.

Every system is judged by `llmrec.evaluation.evaluate_systems` (the evaluation behind `eval_results.json`) on its split
(leave-one-out by time, full ranking over the catalogue, history removed, ties against the target):

- popularity: training interaction counts;
- ItemKNN: item-item cosine of co-occurrence (`llmrec.evaluation.ItemKNN`); its neighbourhood size and
  shrinkage are chosen on the valid users from a small grid, then it is scored once on test;
- ID-only / text-only: llmrec with `model.use_text_embeddings: false` / `model.use_id_embeddings: false`,
  retrieval only (`training.rerank_epochs 0`: the head is never trained, the FAISS top 100 is the ranking);
- hybrid: the default config; its runs give two rows, retrieval and retrieval + rerank.

The learned systems are trained through the real entry point, `scripts/finetune.py`, in a subprocess per
seed, and read back from each run's `eval_results.json`. By default the subprocess runs a snapshot of the
committed code (`git archive HEAD`), so edits made to the checkout while the benchmark runs cannot leak into
half of the runs; the commit is recorded. Writes `bench/results/quality.json` and `bench/results/quality.md`.

    python bench/quality.py                                  # everything, seeds 42 43 44 (over an hour on 2 cores)
    python bench/quality.py --dataset amazon-beauty          # bench/results/quality_amazon_beauty.{json,md}
    python bench/quality.py --reuse                          # rebuild JSON and table from runs/bench-quality/
    python bench/quality.py --quick                          # 1 epoch per stage, seed 42, into runs/bench-quality-quick/
    python bench/quality.py --systems hybrid --seeds 42 --extra "--training.retrieval_epochs 5"
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from common import cpu_model, git_output
from llmrec.config import load_config
from llmrec.data import build_split, load_interaction_data
from llmrec.evaluation import ItemKNN, evaluate_systems, popularity_scores
from quality_report import _rows, render_markdown, render_table
from quality_systems import DATASETS, LEARNED_SYSTEMS, SYSTEMS

ROOT = Path(__file__).resolve().parent.parent
KNN_NEIGHBORS = [2, 5, 10, 20, 50, 100, 200, 0]  # 0 = every item
KNN_SHRINKAGE = [0.0, 5.0, 20.0, 100.0]
QUICK_EXTRA = "--training.retrieval_epochs 1 --training.rerank_epochs 1"
# Every run also scores the top 100: retrieval HR@100 is the candidate recall@100 (the share of test targets
# among the FAISS candidates the head sees), since the candidates are retrieval's top num_candidates (100).
RECALL_KS = "--evaluation.ks 10,20,100"


logger = logging.getLogger("bench.quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ml100k", help="Data set and its default config.")
    parser.add_argument("--config", default=None, help="Relative to the repository root (default: the data set's).")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Training seeds (default 42 43 44; 42 with --quick).")
    parser.add_argument("--systems", nargs="+", default=[system for system in SYSTEMS if system != "hybrid-stage1"],
                        choices=SYSTEMS, help="Default: all but hybrid-stage1.")
    parser.add_argument("--reuse", action="store_true", help="Train nothing: rebuild the JSON and table from existing runs.")
    parser.add_argument("--skip-existing", action="store_true", help="Train only the runs without an eval_results.json.")
    parser.add_argument("--quick", action="store_true",
                        help=f"Smoke test: `{QUICK_EXTRA}`, seed 42, everything under runs/bench-quality-quick/.")
    parser.add_argument("--extra", default="", help="Overrides passed to every finetune.py call, e.g. \"--training.cpu_threads 1\".")
    parser.add_argument("--code", choices=["snapshot", "checkout"], default="snapshot",
                        help="Train with a `git archive HEAD` snapshot (default) or the working tree as it is.")
    parser.add_argument("--work-dir", default=None, help="Model folders and logs (default runs/bench-quality).")
    parser.add_argument("--output", default=None, help="JSON results (default bench/results/quality.json).")
    parser.add_argument("--markdown", default=None, help="Markdown table (default bench/results/quality.md).")
    parser.add_argument("--knn-neighbors", nargs="+", type=int, default=KNN_NEIGHBORS, help="Grid; 0 = every item.")
    parser.add_argument("--knn-shrinkage", nargs="+", type=float, default=KNN_SHRINKAGE, help="Grid.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _fill_defaults(args)
    started = time.perf_counter()

    config = load_config(ROOT / args.config)
    split = build_split(load_interaction_data(config.data), config.data)
    results: dict[str, Any] = {"dataset": args.dataset, "config": args.config, "protocol": _protocol(split, args.dataset),
                               "machine": _machine(), "systems": {}}

    baselines = {"popularity": lambda: _popularity(split),
                 "itemknn": lambda: _itemknn(split, args.knn_neighbors, args.knn_shrinkage)}
    for system in (system for system in args.systems if system in baselines):
        results["systems"][system] = _baseline(system, baselines[system], args)

    learned = [system for system in args.systems if system in LEARNED_SYSTEMS]
    code_root = _code_root(args) if learned and not args.reuse else None
    for system in learned:
        runs = []
        for seed in args.seeds:
            run = _learned_run(system, seed, args, code_root)
            if run is not None:
                runs.append(run)
        results["systems"][system] = {"runs": runs}
        _check_popularity(results, runs)

    results["rows"] = _rows(results)
    results["run"] = {
        "command": "python bench/quality.py " + " ".join(shlex.quote(argument) for argument in sys.argv[1:]),
        "seeds": args.seeds,
        "extra_overrides": args.extra,
        "code": args.code,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for path in (args.output, args.markdown):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    Path(args.markdown).write_text(render_markdown(results))
    logger.info("Wrote %s and %s.", args.output, args.markdown)
    print(render_table(results))


def _fill_defaults(args: argparse.Namespace) -> None:
    """--quick points every default at a scratch folder, so a smoke test never overwrites bench/results."""
    dataset = DATASETS[args.dataset]
    args.config = args.config or dataset.config
    args.extra = f"{RECALL_KS} {args.extra}".strip()
    if args.quick:
        args.extra = f"{QUICK_EXTRA} {args.extra}".strip()
        scratch = ROOT / "runs" / f"bench-quality{dataset.suffix}-quick"
        args.seeds = args.seeds or [42]
        args.work_dir = args.work_dir or str(scratch)
        args.output = args.output or str(scratch / "quality.json")
        args.markdown = args.markdown or str(scratch / "quality.md")
    args.seeds = args.seeds or [42, 43, 44]
    args.work_dir = Path(args.work_dir or ROOT / "runs" / f"bench-quality{dataset.suffix}")
    args.output = args.output or str(ROOT / "bench" / "results" / f"quality{dataset.suffix}.json")
    args.markdown = args.markdown or str(ROOT / "bench" / "results" / f"quality{dataset.suffix}.md")


# ----- baselines ---------------------------------------------------------------------------------------


def _baseline(system: str, fit_and_score, args: argparse.Namespace) -> dict:
    """A deterministic baseline's results, kept in the work folder so --reuse / --skip-existing need not refit it."""
    record_path = args.work_dir / f"{system}.bench.json"
    if (args.reuse or args.skip_existing) and record_path.is_file():
        logger.info("%s: reusing %s.", system, record_path)
        return json.loads(record_path.read_text())
    result = fit_and_score()
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _evaluate(score_function, examples, split, split_name: str, system: str) -> dict[str, float]:
    """One system on one split through `evaluate_systems`, the evaluation behind every run's eval_results.json.

    A baseline has no text encoder, so it gets coverage@k and popularity_percentile@k but no ild@k.
    """
    return evaluate_systems([(split_name, examples, {system: score_function})], split.num_items, ks=[10, 20, 100],
                            item_popularity=split.item_popularity())[split_name][system]


def _popularity(split) -> dict:
    fit_start = time.perf_counter()
    scores = popularity_scores(split.item_popularity())
    fit_seconds = time.perf_counter() - fit_start
    return {
        "valid": _evaluate(scores, split.valid, split, "valid", "popularity"),
        "test": _evaluate(scores, split.test, split, "test", "popularity"),
        "train_seconds": fit_seconds,
    }


def _itemknn(split, neighbor_grid: list[int], shrinkage_grid: list[float]) -> dict:
    """Pick (neighbours, shrinkage) by valid NDCG@10, then score the pick once on test."""
    grid = []
    for num_neighbors in neighbor_grid:
        for shrinkage in shrinkage_grid:
            fit_start = time.perf_counter()
            knn = ItemKNN(num_neighbors or None, shrinkage).fit(split.train_sequences, split.num_items)
            fit_seconds = time.perf_counter() - fit_start
            valid = _evaluate(knn, split.valid, split, "valid", repr(knn))
            grid.append({"num_neighbors": num_neighbors or None, "shrinkage": shrinkage, "valid": valid,
                         "fit_seconds": fit_seconds})
    best = max(grid, key=lambda entry: entry["valid"]["ndcg@10"])
    knn = ItemKNN(best["num_neighbors"], best["shrinkage"]).fit(split.train_sequences, split.num_items)
    logger.info("ItemKNN: chose %r on valid NDCG@10 %.4f.", knn, best["valid"]["ndcg@10"])
    return {
        "chosen": {"num_neighbors": best["num_neighbors"], "shrinkage": best["shrinkage"],
                   "selected_on": "valid ndcg@10"},
        "valid": best["valid"],
        "test": _evaluate(knn, split.test, split, "test", repr(knn)),
        "train_seconds": best["fit_seconds"],
        "grid": grid,
    }


# ----- learned systems ---------------------------------------------------------------------------------


def _code_root(args: argparse.Namespace) -> Path:
    """The code the training subprocesses import: a snapshot of HEAD, or the checkout itself."""
    if args.code == "checkout":
        return ROOT
    commit = git_output(ROOT, "rev-parse", "HEAD")
    snapshot = args.work_dir / "code" / commit[:12]
    if not (snapshot / "scripts" / "finetune.py").is_file():
        snapshot.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive, check=True)
    logger.info("Training with the code of commit %s (%s).", commit[:12], snapshot)
    return snapshot


def _learned_run(system: str, seed: int, args: argparse.Namespace, code_root: Optional[Path]) -> Optional[dict]:
    """Train one (system, seed) through scripts/finetune.py unless told to reuse it; None if there is no result."""
    run_dir = args.work_dir / f"{system}-seed{seed}"
    record_path = args.work_dir / f"{system}-seed{seed}.bench.json"
    overrides = ["--training.seed", str(seed), *shlex.split(args.extra), *LEARNED_SYSTEMS[system]]
    results_path = run_dir / "eval_results.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    reusable = results_path.is_file() and (args.reuse or record.get("overrides") == overrides)
    if args.reuse or (args.skip_existing and reusable):
        if not reusable:
            logger.warning("%s seed %d: no %s; left out.", system, seed, results_path)
            return None
        logger.info("%s seed %d: reusing %s.", system, seed, run_dir)
    else:
        record = _train(run_dir, overrides, args, code_root)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        if record["returncode"] != 0:
            logger.error("%s seed %d failed (exit %d); see %s.", system, seed, record["returncode"], record["log"])
            return None
    eval_results = json.loads(results_path.read_text())
    if eval_results["config"]["training"]["seed"] != seed:
        logger.warning("%s was trained with seed %s, not %d.", run_dir, eval_results["config"]["training"]["seed"], seed)
    return {
        "seed": seed,
        "run_dir": str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir),
        "valid": eval_results["valid"],
        "test": eval_results["test"],
        "best_valid_epochs": eval_results["best_valid_epochs"],
        "timings": eval_results["timings"],
        "num_processes": eval_results.get("num_processes"),
        "cpu_threads": eval_results["config"]["training"]["cpu_threads"],
        "early_stopping_patience": eval_results["config"]["training"]["early_stopping_patience"],
        "subprocess": {key: record.get(key) for key in ("commit", "wall_seconds", "cpu_seconds", "load_average_1min",
                                                           "peak_rss_mb", "command", "started")},
    }


def _train(run_dir: Path, overrides: list[str], args: argparse.Namespace, code_root: Path) -> dict:
    """Run finetune.py in a child process; its own rusage gives this run's peak RSS (not a running max)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config_path = code_root / args.config if (code_root / args.config).is_file() else ROOT / args.config
    command = [sys.executable, str(code_root / "scripts" / "finetune.py"), "--config", str(config_path),
               "--output_dir", str(run_dir), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code_root), os.environ.get("PYTHONPATH")]))}
    log_path = run_dir.parent / f"{run_dir.name}.log"
    logger.info("Training %s: %s (log %s).", run_dir.name, " ".join(shlex.quote(part) for part in command), log_path)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall_seconds = time.perf_counter() - start
    # Wall time grows with whatever else runs on the machine; CPU time much less, so both are kept.
    cpu_seconds = usage.ru_utime + usage.ru_stime
    logger.info("%s: exit %d after %.1f min (%.1f CPU min), peak RSS %.0f MB, load average %.1f.", run_dir.name,
                child.returncode, wall_seconds / 60, cpu_seconds / 60, usage.ru_maxrss / 1024, os.getloadavg()[1])
    return {
        "overrides": overrides,
        "command": command,
        "commit": git_output(ROOT, "rev-parse", "HEAD") if code_root == ROOT else code_root.name,
        "code_root": str(code_root),
        "started": started_at,
        "wall_seconds": round(wall_seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "returncode": child.returncode,
        "log": str(log_path),
    }


def _check_popularity(results: dict, runs: list[dict]) -> None:
    """The runs' own popularity rows must equal ours: the same split, whatever code trained them."""
    ours = results["systems"].get("popularity", {}).get("test")
    for run in runs:
        theirs = run["test"]["popularity"]
        if ours is not None and abs(theirs["ndcg@10"] - ours["ndcg@10"]) > 1e-9:
            logger.warning("%s: popularity NDCG@10 %.6f differs from this split's %.6f; another split?",
                           run["run_dir"], theirs["ndcg@10"], ours["ndcg@10"])


# ----- context -----------------------------------------------------------------------------------------


def _protocol(split, dataset: str) -> dict:
    return {
        "data": DATASETS[dataset].description,
        "split": "leave_one_out by timestamp (ties in file order); valid = second last, test = last interaction",
        "num_items": split.num_items,
        "valid_users": len(split.valid),
        "test_users": len(split.test),
        "training_interactions": int(sum(map(len, split.train_sequences))),
        "ranking": "full catalogue, history removed, ties against the target (llmrec.evaluation.evaluate_ranking)",
    }


def _machine() -> dict:
    return {
        "cpu_model": cpu_model() or platform.processor() or "unknown CPU",
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.date.today().isoformat(),
    }


if __name__ == "__main__":
    main()
