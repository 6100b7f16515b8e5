"""Diversity on request: what MMR re-ranking (`recommend(..., diversity=λ)`) trades, on a trained model's test split.

For each λ the reranked candidate list (FAISS top `num_candidates`, reordered by the head, history removed) is
re-ordered by maximal marginal relevance in the encoder's text space, exactly as `Recommender.recommend` does,
and the whole test split is scored by the protocol of eval_results.json (`evaluate_systems`: full ranking,
one held-out item per user): NDCG@10, HR@10, coverage@10, ild@10 and popularity_percentile@10. λ = 0 is the
plain rerank system, so its row is eval_results.json's test rerank (checked, and recorded). Popularity and
retrieval-only rows are given for reference. A few users are also answered through `Recommender.recommend`
and compared with the lists scored here.

The split is rebuilt from the model's own training config (`config.yaml` in the folder), or from the
`--dataset`'s default config when the folder has none.

    python bench/diversity.py --model runs/ml100k --lambdas 0 0.1 0.3 0.5 0.7 0.9
    python bench/diversity.py --model runs/ml100k --out bench/results/diversity_ml100k   # .json and .md
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import git_commit, load_average, machine, table_header, table_row, write_json_and_markdown
from llmrec import Recommender
from llmrec.config import load_config
from llmrec.data import EvaluationExamples, build_split, load_interaction_data
from llmrec.evaluation import evaluate_systems, popularity_scores, rerank_score_function, retrieval_score_function
from llmrec.ranking import diversified
from llmrec.retrieval import CandidatePipeline
from quality_systems import DATASETS

ROOT = Path(__file__).resolve().parent.parent
METRICS = ["ndcg@10", "hr@10", "coverage@10", "ild@10", "popularity_percentile@10"]
CHECKED_USERS = 25  # users answered through Recommender.recommend as well

logger = logging.getLogger("bench.diversity")


def mmr_score_function(pipeline: CandidatePipeline, num_items: int, diversity: float):
    """The rerank system's candidate lists re-ordered by MMR, as score rows (position order; -inf elsewhere)."""

    def score(histories: list[list[int]]) -> torch.Tensor:
        candidates, head_scores = pipeline.retrieve_and_rerank(histories)
        head_scores = head_scores.float().cpu().numpy()
        rows = torch.full((len(histories), num_items + 1), float("-inf"))
        for row in range(len(histories)):
            order = np.argsort(-head_scores[row], kind="stable")  # best first, as Ranker sorts the head's list
            listed, _ = diversified(candidates[row][order], head_scores[row][order], pipeline.item_text_embeddings,
                                    diversity, len(order))
            rows[row, torch.as_tensor(listed)] = torch.arange(len(listed), 0, -1, dtype=torch.float32)
        return rows

    return score


def split_for_model(recommender: Recommender, dataset: str):
    """The model's training split (from its config.yaml, else the data set's default config), on its item indices."""
    if recommender.training_config:
        config, source = load_config(overrides=recommender.training_config), "the model folder's config.yaml"
    else:
        config, source = load_config(ROOT / DATASETS[dataset].config), DATASETS[dataset].config
    split = build_split(load_interaction_data(config.data), config.data)
    unknown = [item_id for item_id in split.item_ids if item_id not in recommender.item_index]
    if unknown:
        raise SystemExit(f"The data set has {len(unknown)} item id(s) the model lacks (e.g. {unknown[:3]}); "
                         "pass the model trained on this data set.")
    to_model = np.array([0] + [recommender.item_index[item_id] for item_id in split.item_ids], dtype=np.int64)
    test = EvaluationExamples(list(split.test.user_indices), [to_model[history].tolist() for history in split.test.histories],
                              to_model[split.test.targets].tolist())
    popularity = np.zeros(recommender.num_items + 1)
    popularity[to_model] = split.item_popularity()  # training counts
    return config, source, test, popularity


def check_against_recommend(recommender: Recommender, test: EvaluationExamples, diversity: float,
                            pipeline: CandidatePipeline) -> bool:
    """Whether `Recommender.recommend(..., diversity=λ)` gives the top 10 scored here, for the first users."""
    histories = test.histories[:CHECKED_USERS]
    rows = mmr_score_function(pipeline, recommender.num_items, diversity)(histories)
    for history, row in zip(histories, rows):
        scored = [recommender.item_ids[index - 1] for index in torch.argsort(-row, stable=True)[:10].tolist()]
        answered = recommender.recommend([recommender.item_ids[index - 1] for index in history], k=10, diversity=diversity)
        if [item_id for item_id, _ in answered] != scored:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A trained model folder (a finetune output_dir).")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ml100k",
                        help="Names the results; its config builds the split when the folder has no config.yaml.")
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.0, 0.1, 0.3], help="MMR trade-offs λ in [0, 1].")
    parser.add_argument("--out", default=None, help="Results path without suffix (default bench/results/diversity_<dataset>).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    args = parser.parse_args()
    if any(not 0.0 <= value <= 1.0 for value in args.lambdas):
        parser.error(f"--lambdas must lie in [0, 1]; got {args.lambdas}.")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"{args.model} holds no trained model (no config.json).")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started, at_start = time.perf_counter(), machine()

    recommender = Recommender.from_pretrained(args.model)
    config, source, test, popularity = split_for_model(recommender, args.dataset)
    pipeline = CandidatePipeline(recommender.model, recommender.pipeline.index, config.retrieval.num_candidates,
                                 config.retrieval.exclude_history)
    num_items = recommender.num_items
    systems = {"popularity": popularity_scores(popularity), "retrieval": retrieval_score_function(pipeline, num_items)}
    for diversity in args.lambdas:
        systems[f"rerank, lambda={diversity:g}"] = (rerank_score_function(pipeline, num_items) if diversity == 0
                                              else mmr_score_function(pipeline, num_items, diversity))
    rows = {}
    for name, score_function in systems.items():
        system_started = time.perf_counter()
        metrics = evaluate_systems([("test", test, {name: score_function})], num_items, ks=[10],
                                   item_text_embeddings=pipeline.item_text_embeddings, item_popularity=popularity)["test"][name]
        rows[name] = {**metrics, "seconds": round(time.perf_counter() - system_started, 1)}
    results = {
        "model": str(Path(args.model).resolve()), "dataset": args.dataset, "split_from": source,
        "protocol": "test split, leave-one-out, full ranking over the catalogue, history removed (evaluate_systems); "
                    f"MMR over the head's {config.retrieval.num_candidates} reranked candidates in the encoder's text space",
        "lambdas": args.lambdas, "rows": rows,
        "plain_rerank_matches_eval_results": _matches_eval_results(recommender, rows, args.lambdas),
        "recommend_agrees_on_first_users": {f"{diversity:g}": check_against_recommend(recommender, test, diversity, pipeline)
                                            for diversity in args.lambdas},
        "machine": at_start, "load_average_at_end": load_average(), "wall_seconds": round(time.perf_counter() - started, 1),
        "commit": git_commit(), "command": "python bench/diversity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"diversity_{args.dataset.replace('-', '_')}")
    markdown = render_markdown(results)
    write_json_and_markdown(out.with_suffix(".json"), results, markdown)
    print(markdown)


def _matches_eval_results(recommender: Recommender, rows: dict[str, Any], lambdas: list[float]) -> Any:
    """Whether the λ = 0 row reproduces the folder's eval_results.json test rerank NDCG@10 / HR@10 (None: nothing to check)."""
    recorded = (recommender.eval_results or {}).get("test", {}).get("rerank")
    if recorded is None or 0.0 not in lambdas:
        return None
    plain = rows["rerank, lambda=0"]
    return all(abs(plain[metric] - recorded[metric]) < 1e-6 for metric in ("ndcg@10", "hr@10"))


def render_markdown(results: dict[str, Any]) -> str:
    """The table: one row per system / λ, the metrics at 10, and where and how it was measured."""
    at_start = results["machine"]
    lines = [
        f"# Diversity on request: MMR re-ranking ({results['dataset']}, test split)",
        "",
        f"Model `{results['model']}`; {results['protocol']}. coverage@10 = share of the catalogue in at least one "
        "user's top 10; ild@10 = mean pairwise cosine distance within a top 10 (text embeddings); "
        "popularity_percentile@10 = mean popularity percentile of the recommended items (1 = most popular).",
        "",
        *table_header(["system", *METRICS, "seconds"], "l" + "r" * (len(METRICS) + 1)),
    ]
    for name, metrics in results["rows"].items():
        label = name.replace("lambda=", "MMR λ = ") if name != "rerank, lambda=0" else "rerank (λ = 0, plain)"
        lines.append(table_row([label, *(f"{metrics[metric]:.4f}" for metric in METRICS), metrics["seconds"]]))
    agree = results["recommend_agrees_on_first_users"]
    lines += [
        "",
        f"λ = 0 reproduces eval_results.json's test rerank NDCG@10 / HR@10: {results['plain_rerank_matches_eval_results']}. "
        f"`Recommender.recommend(..., diversity=λ)` gives the same top 10 for the first {CHECKED_USERS} test users: "
        + ", ".join(f"λ={value}: {same}" for value, same in agree.items()) + ".",
        "",
        f"{at_start['date']}, {at_start['cpu']}, {at_start['cores']} cores, {at_start['torch_threads']} torch thread(s), "
        f"load average {at_start['load_average_at_start']} at start, {results['load_average_at_end']} at end "
        f"(the machine was shared); {results['wall_seconds']} s in all; commit {results['commit']}; `{results['command']}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
