"""Would item popularity pay as a reranking feature? A probe on trained models, before building it (issue 15).

For each saved folder, the head's scores of its FAISS candidates get `beta * p(item)` added, with p the
item's log training count scaled to [0, 1], for a grid of beta; valid and test NDCG@10 / HR@10 for each. A
learned feature can do no better on valid than the best additive beta unless it interacts with the user,
so if beta = 0 is best on valid the feature is not built (test is reported, never used to choose).

    python bench/rerank_popularity_probe.py --model 42=runs/ml100k_s42 43=runs/ml100k_s43 44=runs/ml100k_s44
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, machine, table_header, table_row, write_results  # noqa: E402
from llmrec import Recommender  # noqa: E402
from llmrec.config import load_config  # noqa: E402
from llmrec.data import build_split, load_interaction_data  # noqa: E402
from llmrec.evaluation import evaluate_ranking, scores_from_candidates  # noqa: E402

BETAS = (0.0, 0.5, 1.0, 2.0, 4.0, -1.0)


def probe(folder: Path) -> dict:
    recommender = Recommender.from_pretrained(folder)
    config = load_config(folder / "config.yaml")
    split = build_split(load_interaction_data(config.data), config.data)
    popularity = torch.as_tensor(np.log1p(split.item_popularity()), dtype=torch.float32)
    popularity = popularity / popularity.max()
    results = {}
    for part, examples in (("valid", split.valid), ("test", split.test)):
        candidates, scores = recommender.pipeline.retrieve_and_rerank(examples.histories)
        candidates, scores = torch.as_tensor(candidates), scores.float().cpu()
        for beta in BETAS:
            dense = scores_from_candidates(candidates, scores + beta * popularity[candidates], split.num_items)
            def score(histories, positions, dense=dense):
                return dense[torch.as_tensor(positions)]

            score.takes_positions = True  # evaluate_ranking passes each batch's example positions
            metrics = evaluate_ranking(score, examples.histories, examples.targets, split.num_items, ks=[10])
            results.setdefault(str(beta), {})[part] = {name: metrics[name] for name in ("ndcg@10", "hr@10")}
    return results


def render(report: dict) -> str:
    lines = ["# Item popularity as a reranking feature: an additive probe (issue 15)", "",
             f"Commit {report['commit']}, {report['machine']['date']}. Made by `bench/rerank_popularity_probe.py`: "
             "the head's candidate scores + beta x (log training count, scaled to [0, 1]).", ""]
    lines += table_header(["model", *[f"beta {beta}: valid / test NDCG@10" for beta in BETAS], "best beta on valid"],
                          "l" + "r" * (len(BETAS) + 1))
    for name, results in report["models"].items():
        cells = [f"{results[str(beta)]['valid']['ndcg@10']:.4f} / {results[str(beta)]['test']['ndcg@10']:.4f}" for beta in BETAS]
        best = max(BETAS, key=lambda beta: results[str(beta)]["valid"]["ndcg@10"])
        lines.append(table_row([name, *cells, f"{best:g}"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, help="NAME=FOLDER of trained models.")
    parser.add_argument("--name", default="rerank_popularity_probe_ml100k", help="Results file stem under bench/results/.")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    folders = dict(spec.split("=", 1) for spec in arguments.model)
    report = {"commit": git_commit(), "machine": machine(), "betas": list(BETAS),
              "models": {name: probe(Path(folder)) for name, folder in folders.items()}, "folders": folders}
    _, markdown_path = write_results(arguments.name, report, render(report))
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
