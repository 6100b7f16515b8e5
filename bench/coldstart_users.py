"""The cold-users run of bench/coldstart.py: users held out of training, ranked from their profile and first items."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from coldstart_common import SYSTEMS, _random_expectation, _replace_block, machine_line
from common import table_header
from llmrec import Recommender
from llmrec.config import load_config
from llmrec.data import EvaluationExamples, build_split, load_interaction_data
from llmrec.evaluation import (
    evaluate_ranking,
    popularity_scores,
    profile_score_functions,
    rerank_score_function,
    retrieval_score_function,
)
from llmrec.finetune import run_finetune
from llmrec.training.profiles import embed_user_profiles

USERS_TABLE_START, USERS_TABLE_END = "<!-- coldstart-users-table:start -->", "<!-- coldstart-users-table:end -->"


def run_cold_users(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    run_dir = Path(args.work_dir) / "cold_users_hybrid_profiles"
    overrides = {
        "output_dir": str(run_dir),
        "data": {"split": "cold_users", "cold_user_fraction": args.cold_user_fraction, "cold_user_history_length": 3},
        "model": {**SYSTEMS["hybrid"], "use_user_profiles": True},
        "training": {"retrieval_epochs": args.retrieval_epochs, "rerank_epochs": args.rerank_epochs,
                     "profile_epochs": args.profile_epochs, "cpu_threads": args.threads},
    }
    config = load_config(args.config, overrides)
    data = load_interaction_data(config.data)
    split = build_split(data, config.data)
    run_results = run_finetune(config)

    results: dict = {"protocol": _users_protocol(split, config), "rows": _evaluate_rows(data, split, run_dir)}
    # The same examples as run_finetune's own evaluation (first 3 items = cold_test), kept as a cross-check.
    results["run_finetune"] = {name: run_results[name] for name in ("cold_test", "cold_test_with_profile",
                                                                    "cold_test_profile_only", "test")}
    results["best_valid_epochs"] = run_results["best_valid_epochs"]
    results["profile_training_losses"] = run_results["profile_training_losses"]
    results["timings"] = {name: round(value, 1) for name, value in run_results["timings"].items()}
    results["caps"] = {"retrieval_epochs": args.retrieval_epochs, "rerank_epochs": args.rerank_epochs,
                       "profile_epochs": args.profile_epochs,
                       "early_stopping_patience": config.training.early_stopping_patience}
    results["run"] = {
        "machine": machine_line(args.threads),
        "load_average": os.getloadavg(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "command": f"python bench/coldstart.py --split cold_users --retrieval-epochs {args.retrieval_epochs} "
                   f"--rerank-epochs {args.rerank_epochs} --profile-epochs {args.profile_epochs} "
                   f"--cold-user-fraction {args.cold_user_fraction} --threads {args.threads}",
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    table = render_users_table(results)
    _replace_block(Path(args.readme), USERS_TABLE_START, USERS_TABLE_END,
                   f"{table}\n\n{results['run']['machine']}; wall time {results['run']['wall_seconds'] / 60:.1f} min; "
                   f"`{results['run']['command']}`.")
    print(table)


def _evaluate_rows(data, split, run_dir: Path) -> list[dict]:
    """Each row of the table: what the ranker knows about a cold user, and its NDCG / HR on their 4th item."""
    cold, num_items = split.cold_test, split.num_items
    recommender = Recommender.from_pretrained(run_dir)
    pipeline = recommender.pipeline
    profiles = [split.user_profiles[user] for user in cold.user_indices]
    if any(profile is None for profile in profiles):
        raise RuntimeError("Every MovieLens-100k user has a row in ml-100k.user; a cold user without a profile means "
                           "the users file was not read.")
    embeddings, has_profile = embed_user_profiles(recommender.model, recommender.tokenizer, profiles)
    nothing = [[] for _ in cold.targets]
    first_one, first_three = [history[:1] for history in cold.histories], [history[:3] for history in cold.histories]

    def from_history():
        return {"retrieval": retrieval_score_function(pipeline, num_items), "rerank": rerank_score_function(pipeline, num_items)}

    def with_profile():  # single-pass score functions: a fresh pair per evaluation
        return profile_score_functions(pipeline, embeddings, has_profile, num_items)

    rows = [
        ("popularity", "nothing", nothing, {"ranking": popularity_scores(split.item_popularity())}),
        ("*popularity in the user's gender × occupation group (reference)*", "gender, occupation", nothing,
         {"ranking": _group_popularity_scores(data, split, cold.user_indices)}),
        ("hybrid", "first item", first_one, from_history()),
        ("hybrid", "first 3 items", first_three, from_history()),
        ("hybrid", "profile only", nothing, with_profile()),
        ("hybrid", "profile + first item", first_one, with_profile()),
        ("hybrid", "profile + first 3 items", first_three, with_profile()),
    ]
    evaluated = []
    for system, knows, histories, score_functions in rows:
        metrics = {stage: evaluate_ranking(score_function, histories, cold.targets, num_items, ks=[10, 20],
                                           desc=f"{system} / {knows} / {stage}")
                   for stage, score_function in score_functions.items()}
        evaluated.append({"system": system, "knows": knows, **metrics})
    evaluated.append({"system": "*random (expected)*", "knows": "nothing",
                      "ranking": _random_expectation(EvaluationExamples(histories=nothing), num_items)})
    return evaluated


def _users_protocol(split, config) -> dict:
    return {
        "data": "MovieLens-100k (RecBole copy: ml-100k.inter, .item, .user), every interaction a positive",
        "split": f"cold_users, {config.data.cold_user_fraction:.0%} of the users held out of training "
                 f"(seed {config.data.seed})",
        "cold_users": len(split.cold_test),
        "target": "each cold user's 4th interaction (after their first 3), the same for every row",
        "profile": f"data.user_profile_template {config.data.user_profile_template!r}, e.g. "
                   f"{split.user_profiles[split.cold_test.user_indices[0]]!r}",
        "num_items": split.num_items,
        "ranking": "full catalogue, the row's history removed, ties against the target",
    }


def _group_popularity_scores(data, split, users: list[int]):
    """Training popularity among users of the same gender and occupation as each cold user (global popularity
    breaks ties): what the demographic profile alone could tell without any learning. Follows the cold users
    in order, batch by batch, as `evaluate_ranking` passes them."""
    attributes = data.users.to_pandas().set_index("user_id")
    group_of = {user_id: (row.gender, row.occupation) for user_id, row in attributes.iterrows()}
    overall = split.item_popularity()
    counts: dict = {}
    for user, sequence in enumerate(split.train_sequences):
        if sequence:
            group = group_of[split.user_ids[user]]
            counts.setdefault(group, np.zeros(split.num_items + 1))
            counts[group] += np.bincount(sequence, minlength=split.num_items + 1)
    rows = np.stack([counts.get(group_of[split.user_ids[user]], 0.0) + overall / (overall.sum() + 1.0) for user in users])
    rows[:, 0] = -np.inf
    scores = torch.as_tensor(rows, dtype=torch.float64)
    position = 0

    def score(histories):
        nonlocal position
        batch = scores[position : position + len(histories)]
        position += len(histories)
        return batch

    return score


def render_users_table(results: dict) -> str:
    lines = table_header(["system", "knows about the user", "NDCG@10", "HR@10", "+ rerank NDCG@10", "+ rerank HR@10"])
    for row in results["rows"]:
        first = row.get("ranking", row.get("retrieval"))
        rerank = row.get("rerank")
        cells = [f"{first['ndcg@10']:.4f}", f"{first['hr@10']:.4f}"]
        cells += [f"{rerank['ndcg@10']:.4f}", f"{rerank['hr@10']:.4f}"] if rerank else ["–", "–"]
        lines.append(f"| {row['system']} | {row['knows']} | {' | '.join(cells)} |")
    return "\n".join(lines)
