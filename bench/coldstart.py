"""Cold-start benchmark on MovieLens-100k: held-out items (`--split cold_items`) or held-out users (`--split cold_users`).

`--split cold_items` (default): popularity, ID-only, text-only and hybrid on cold and warm items. One
`data.split: cold_items` split (a seeded random share of the items held out of training with every
interaction on them) serves every system, so the numbers share one protocol:

- cold: each user's first interaction that lands on a held-out item, history = everything before it;
- warm: leave-one-out on each user's sequence without the held-out items (the usual test target);

both ranked over the full catalogue (warm and cold items), each user's history removed. Writes
`bench/results/coldstart.json` and the Markdown table between the coldstart-table markers in `bench/README.md`.

`--split cold_users`: one `data.split: cold_users` split holds a seeded 10 % of the users out of training.
Every held-out user is judged on one target, their 4th interaction (after the first 3), ranked over the full
catalogue with whatever history the row shows removed, by the same `evaluate_ranking`. What the recommender
knows about them varies by row: nothing (popularity), their first 1 or 3 items, their demographic profile
text from ml-100k.user ("24-year-old male technician") alone, or profile + 1 or 3 items. One hybrid model
with `model.use_user_profiles` serves every llmrec row (profile path fitted after training, towers frozen).
A reference row ranks by popularity among training users of the same gender and occupation. Writes
`bench/results/coldstart_users.json` and the table between the coldstart-users-table markers.

    OMP_NUM_THREADS=1 python bench/coldstart.py --retrieval-epochs 20 --rerank-epochs 3
    OMP_NUM_THREADS=1 python bench/coldstart.py --split cold_users --retrieval-epochs 20 --rerank-epochs 3 --profile-epochs 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coldstart_common import SYSTEMS, _random_expectation, _replace_block, machine_line
from coldstart_frontier import frontier
from coldstart_users import run_cold_users
from common import table_header
from llmrec import Recommender
from llmrec.config import load_config
from llmrec.data import build_split, load_interaction_data
from llmrec.evaluation import (
    evaluate_ranking,
    popularity_scores,
    rerank_score_function,
    retrieval_score_function,
    scores_from_candidates,
)
from llmrec.finetune import run_finetune

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("bench.coldstart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="cold_items", choices=["cold_items", "cold_users"])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ml100k.yaml"))
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-coldstart"), help="Model folders (not committed).")
    parser.add_argument("--output", default=None,
                        help="Default: bench/results/coldstart.json (cold_items) or coldstart_users.json (cold_users).")
    parser.add_argument("--readme", default=str(ROOT / "bench" / "README.md"))
    parser.add_argument("--retrieval-epochs", type=int, default=20)
    parser.add_argument("--rerank-epochs", type=int, default=3)
    parser.add_argument("--cold-item-fraction", type=float, default=0.15)
    parser.add_argument("--cold-item-selection", default="random", choices=["random", "newest"])
    parser.add_argument("--id-dropout", type=float, default=None, help="Override model.id_dropout of the hybrid.")
    parser.add_argument("--id-residual-max-ratio", type=float, default=None,
                        help="Override model.id_residual_max_ratio of the hybrid (ID part bounded by the text part).")
    parser.add_argument("--impute-missing-ids", action="store_true",
                        help="Set model.impute_missing_ids in the hybrid (IDs of new items predicted from their text).")
    parser.add_argument("--seed", type=int, default=None, help="Override training.seed (the newest-items split does not depend on it).")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--append", action="store_true",
                        help="Add this run's systems to those already in --output (same split), e.g. one system per process.")
    parser.add_argument("--ablation", action="store_true",
                        help="Also train the hybrid with items unseen in training kept in the softmax as negatives.")
    parser.add_argument("--cold-user-fraction", type=float, default=0.1)
    parser.add_argument("--profile-epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.split == "cold_users":
        args.output = args.output or str(ROOT / "bench" / "results" / "coldstart_users.json")
        run_cold_users(args)
    else:
        args.output = args.output or str(ROOT / "bench" / "results" / "coldstart.json")
        run_cold_items(args)


def run_cold_items(args: argparse.Namespace) -> None:
    started = time.perf_counter()

    base_overrides = {
        "data": {"split": "cold_items", "cold_item_fraction": args.cold_item_fraction,
                 "cold_item_selection": args.cold_item_selection},
        "training": {"retrieval_epochs": args.retrieval_epochs, "rerank_epochs": args.rerank_epochs,
                     "cpu_threads": args.threads, **({"seed": args.seed} if args.seed is not None else {})},
    }
    config = load_config(args.config, base_overrides)
    data = load_interaction_data(config.data)
    split = build_split(data, config.data)
    cold, warm = split.cold_test, split.test
    results: dict = {"protocol": _protocol(split, config), "systems": {}}

    popularity = split.item_popularity()
    results["systems"]["popularity"] = {
        "cold": _evaluate(popularity_scores(popularity), cold, split.num_items),
        "warm": _evaluate(popularity_scores(popularity), warm, split.num_items),
    }
    results["references"] = _references(data, split)

    systems = {name: SYSTEMS[name] for name in args.systems}
    if args.ablation:
        systems["hybrid, unseen items as negatives"] = {**SYSTEMS["hybrid"], "exclude_unseen_items_from_loss": False}
    for name, system_overrides in systems.items():
        entry = _learned_system(name, system_overrides, base_overrides, split, args)
        results["systems"][name] = entry
        logger.info("%s: %s", name, json.dumps({stage: entry[stage] for stage in ("retrieval", "rerank")}))

    results["run"] = {
        "machine": machine_line(args.threads),
        "load_average": os.getloadavg(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "command": _cold_items_command(args),
    }
    output = Path(args.output)
    if args.append and output.is_file():
        results = _appended(json.loads(output.read_text()), results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    _write_table(Path(args.readme), output.stem, results)
    print(render_table(results))


def _appended(earlier: dict, results: dict) -> dict:
    """`earlier`'s systems followed by this run's (which replace any of the same name), and both runs recorded."""
    if earlier.get("protocol") != results["protocol"]:
        raise SystemExit(f"--append: the split differs from the one in the output file ({earlier.get('protocol')}).")
    runs = earlier.get("runs", [earlier["run"]] if "run" in earlier else [])
    return {**results, "systems": {**earlier["systems"], **results["systems"]}, "runs": [*runs, results["run"]]}


def _references(data, split) -> dict:
    """References that cheat on purpose, and the random expectation."""
    cold, warm = split.cold_test, split.test
    # Item popularity counted over the whole log, held-out interactions included (what a popularity ranker
    # could at best do on cold items), and the same restricted to cold items.
    oracle = _full_log_popularity(data, split)
    cold_only = np.where(np.isin(np.arange(len(oracle)), split.cold_item_indices), oracle, -1.0)
    return {
        "popularity, full log (oracle)": {"cold": _evaluate(popularity_scores(oracle), cold, split.num_items)},
        "popularity among cold items (oracle)": {"cold": _evaluate(popularity_scores(cold_only), cold, split.num_items),
                                                 "cold_among_cold": _evaluate(popularity_scores(cold_only), cold, split.num_items)},
        "random (expected)": {"cold": _random_expectation(cold, split.num_items),
                              "cold_among_cold": _random_expectation(cold, len(split.cold_item_indices), among_cold=True),
                              "warm": _random_expectation(warm, split.num_items)},
    }


def _learned_system(name: str, system_overrides: dict, base_overrides: dict, split, args: argparse.Namespace) -> dict:
    """Train one learned system on the cold-items split and evaluate it on cold and warm test users."""
    cold = split.cold_test
    model_overrides = dict(system_overrides)
    if name.startswith("hybrid") and args.id_dropout is not None:
        model_overrides["id_dropout"] = args.id_dropout
    if name.startswith("hybrid") and args.id_residual_max_ratio is not None:
        model_overrides["id_residual_max_ratio"] = args.id_residual_max_ratio
    if name.startswith("hybrid") and args.impute_missing_ids:
        model_overrides["impute_missing_ids"] = True
    run_dir = Path(args.work_dir) / re.sub(r"\W+", "_", name.lower())
    overrides = {**base_overrides, "output_dir": str(run_dir), "model": model_overrides}
    system_start = time.perf_counter()
    run_results = run_finetune(load_config(args.config, overrides))
    recommender = Recommender.from_pretrained(run_dir)
    pipeline = recommender.pipeline
    entry = {}
    cold_items = np.asarray(split.cold_item_indices, dtype=np.int64)
    for stage, score_function in (("retrieval", retrieval_score_function), ("rerank", rerank_score_function)):
        entry[stage] = {
            "cold": _evaluate(score_function(pipeline, split.num_items), cold, split.num_items),
            "cold_among_cold": _evaluate(_among(pipeline, stage, cold_items, split.num_items), cold, split.num_items),
            "warm": run_results["test"][stage],
        }
    entry["valid_warm"] = {stage: run_results["valid"][stage] for stage in ("retrieval", "rerank")}
    entry["best_valid_epochs"] = run_results["best_valid_epochs"]
    entry["diagnostics"] = _cold_bias_diagnostics(recommender, split)
    if name.startswith("hybrid"):  # what the default model can trade between new and warm items
        entry["frontier"] = frontier(recommender, split)
    entry["seconds"] = round(time.perf_counter() - system_start, 1)
    return entry


def _cold_items_command(args: argparse.Namespace) -> str:
    """The command line that repeats this run, as the README quotes it."""
    config = Path(args.config).resolve()
    config = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    return f"python bench/coldstart.py --config {config} --systems {' '.join(args.systems)} " + " ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in [
            ("retrieval_epochs", args.retrieval_epochs), ("rerank_epochs", args.rerank_epochs),
            ("cold_item_fraction", args.cold_item_fraction), ("cold_item_selection", args.cold_item_selection)]
    ) + (f" --id-dropout {args.id_dropout}" if args.id_dropout is not None else "") \
      + (f" --id-residual-max-ratio {args.id_residual_max_ratio}" if args.id_residual_max_ratio is not None else "") \
      + (" --impute-missing-ids" if args.impute_missing_ids else "") \
      + (f" --seed {args.seed}" if args.seed is not None else "") \
      + (" --ablation" if args.ablation else "") + (" --append" if args.append else "")


def _protocol(split, config) -> dict:
    return {
        "data": config.data.path or "MovieLens-100k (RecBole copy), every interaction a positive",
        "split": f"cold_items, {config.data.cold_item_fraction:.0%} of the interacted items held out "
                 f"({config.data.cold_item_selection}, seed {config.data.seed})",
        "num_items": split.num_items,
        "num_cold_items": len(split.cold_item_indices),
        "cold_test_users": len(split.cold_test),
        "warm_test_users": len(split.test),
        "training_interactions": int(sum(map(len, split.train_sequences))),
        "ranking": "full catalogue (warm + cold), history removed, ties against the target",
    }


def _evaluate(score_function, examples, num_items: int) -> dict:
    return evaluate_ranking(score_function, examples.histories, examples.targets, num_items, ks=[10, 20])


def _among(pipeline, stage: str, allowed: np.ndarray, num_items: int):
    """Scores with every item outside `allowed` at -inf: the cold target ranked among the cold items only."""

    def score(histories):
        if stage == "retrieval":
            candidate_scores, candidates = pipeline.retrieve(histories, allowed=allowed)
        else:
            candidates, candidate_scores = pipeline.retrieve_and_rerank(histories, allowed=allowed)
        return scores_from_candidates(torch.as_tensor(candidates), torch.as_tensor(candidate_scores).cpu(), num_items)

    return score


def _full_log_popularity(data, split) -> np.ndarray:
    counts = np.zeros(split.num_items + 1)
    for item_id in data.interactions["item_id"]:
        counts[split.item_index[item_id]] += 1
    counts[0] = 0.0
    return counts


@torch.inference_mode()
def _cold_bias_diagnostics(recommender: Recommender, split) -> dict:
    """Is a cold item (text only) scored on the same scale as a warm one?

    For the warm test users: the mean cosine of their user vector with cold vs warm items, the share of
    cold items in their top 10 against the cold share of the catalogue, and the vector norms.
    """
    pipeline = recommender.pipeline
    items = pipeline.item_embeddings[1:]
    cold = torch.zeros(split.num_items, dtype=torch.bool)
    cold[torch.as_tensor(split.cold_item_indices) - 1] = True
    users = pipeline.user_embeddings(split.test.histories)
    cosine = F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T
    top10 = cosine.topk(10, dim=-1).indices
    return {
        "mean_cosine_cold_items": float(cosine[:, cold].mean()),
        "mean_cosine_warm_items": float(cosine[:, ~cold].mean()),
        "cold_share_of_top10": float(cold[top10].float().mean()),
        "cold_share_of_catalogue": float(cold.float().mean()),
        "mean_norm_cold_items": float(items[cold].norm(dim=-1).mean()),
        "mean_norm_warm_items": float(items[~cold].norm(dim=-1).mean()),
    }


def render_table(results: dict) -> str:
    columns = [("cold", "ndcg@10"), ("cold", "hr@10"), ("cold_among_cold", "ndcg@10"), ("cold_among_cold", "hr@10"),
               ("warm", "ndcg@10"), ("warm", "hr@10")]
    rows = table_header(["system", "cold NDCG@10", "cold HR@10", "cold among cold NDCG@10", "cold among cold HR@10",
                         "warm NDCG@10", "warm HR@10"])

    def cells(metrics: dict) -> str:
        return " | ".join(f"{metrics[part][name]:.4f}" if part in metrics else "–" for part, name in columns)

    for name, entry in results["systems"].items():
        stages = [("", entry)] if name == "popularity" else [(" retrieval", entry["retrieval"]), (" + rerank", entry["rerank"])]
        for label, metrics in stages:
            rows.append(f"| {name}{label} | {cells(metrics)} |")
    for name, entry in results["references"].items():
        rows.append(f"| *{name}* | {cells(entry)} |")
    return "\n".join(rows)


def _write_table(readme: Path, stem: str, results: dict) -> None:
    """Replace the table between the markers named after the results file (coldstart_newest.json:
    coldstart-newest-table), so each split's table has its own place; the rest of the README is by hand."""
    name = stem.replace("_", "-")
    runs = results.get("runs", [results["run"]])
    lines = "; ".join(f"wall time {run['wall_seconds'] / 60:.1f} min, `{run['command']}`" for run in runs)
    _replace_block(readme, f"<!-- {name}-table:start -->", f"<!-- {name}-table:end -->",
                   f"{render_table(results)}\n\n{results['run']['machine']}; {lines}.")




if __name__ == "__main__":
    main()
