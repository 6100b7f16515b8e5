"""What the reranking head can gain, and what it is trained on: the ceiling table of issue 15.

For each trained model folder (a finetune output, with the config.yaml it was trained with):

- the share of stage-2 training lists, validation lists and test lists whose target is among the FAISS
  candidates (candidate recall@num_candidates), built exactly as training and evaluation build them;
- NDCG@10 / HR@10 of retrieval order and of the head's order, over all users and over the users whose
  target is among the candidates (the head cannot help the others: their target ranks past the list).

    python bench/rerank_ceiling.py --model base=runs/ml100k --model holdout=runs/ml100k_holdout \
        --name rerank_ceiling_ml100k
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, machine, rounded_load_average, table_header, table_row, write_results  # noqa: E402
from llmrec import Recommender  # noqa: E402
from llmrec.config import load_config  # noqa: E402
from llmrec.data import build_split, load_interaction_data  # noqa: E402
from llmrec.retrieval import CandidatePipeline  # noqa: E402
from llmrec.training.examples import held_out_prefixes, rerank_prefixes  # noqa: E402
from llmrec.training.trainer import stage2_candidate_items  # noqa: E402
from llmrec.utils.length_order import length_sorted_batches  # noqa: E402

CUTOFF = 10


def target_positions(pipeline: CandidatePipeline, histories: list[list[int]], targets: list[int], rerank: bool,
                     allowed: np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
    """0-based rank of each target in its candidate list (retrieval order, or the head's), -1 where it is absent."""
    positions = np.full(len(histories), -1, dtype=np.int64)
    for rows in length_sorted_batches([len(history) for history in histories], batch_size):
        batch = [histories[row] for row in rows]
        _, candidates = pipeline.retrieve(batch, allowed=allowed)
        if rerank:
            scores, _ = pipeline.rerank(batch, candidates)
            order = torch.argsort(scores.float().cpu(), dim=1, descending=True, stable=True).numpy()
            candidates = np.take_along_axis(candidates, order, axis=1)
        for row, candidate_row in zip(rows, candidates):
            hit = np.flatnonzero(candidate_row == targets[row])
            positions[row] = int(hit[0]) if hit.size else -1
    return positions


def list_metrics(positions: np.ndarray) -> dict[str, float]:
    """NDCG@10 / HR@10 from 0-based target ranks (-1 = not in the list), over all lists and over the hits."""
    gains = np.where((positions >= 0) & (positions < CUTOFF), 1.0 / np.log2(np.maximum(positions, 0) + 2.0), 0.0)
    hits = (positions >= 0) & (positions < CUTOFF)
    present = positions >= 0
    return {
        f"ndcg@{CUTOFF}": float(gains.mean()), f"hr@{CUTOFF}": float(hits.mean()),
        f"ndcg@{CUTOFF}_target_in_candidates": float(gains[present].mean()) if present.any() else 0.0,
        f"hr@{CUTOFF}_target_in_candidates": float(hits[present].mean()) if present.any() else 0.0,
    }


def measure(folder: Path) -> dict:
    """The ceiling figures of one model folder, on the split and settings of the config it was trained with."""
    config = load_config(folder / "config.yaml")
    split = build_split(load_interaction_data(config.data), config.data)
    recommender = Recommender.from_pretrained(folder)
    if tuple(recommender.item_ids) != tuple(split.item_ids):
        raise SystemExit(f"{folder}: its catalogue is not the one its config.yaml builds; measure a finetune output.")
    model = recommender.model
    pipeline = CandidatePipeline(model, recommender.pipeline.index, config.retrieval.num_candidates,
                                 config.retrieval.exclude_history)
    training = config.training
    prefixes = held_out_prefixes if training.rerank_holdout else rerank_prefixes
    histories, targets = prefixes(split.train_sequences, training.rerank_positions_per_user)
    train_positions = target_positions(pipeline, histories, targets, rerank=False, allowed=stage2_candidate_items(model))
    result = {"folder": str(folder), "rerank_holdout": training.rerank_holdout,
              "rerank_positions_per_user": training.rerank_positions_per_user,
              "num_candidates": config.retrieval.num_candidates,
              "train_lists": len(histories), "train_target_in_candidates": float((train_positions >= 0).mean())}
    for name in ("valid", "test"):
        examples = getattr(split, name)
        retrieved = target_positions(pipeline, list(examples.histories), list(examples.targets), rerank=False)
        reranked = target_positions(pipeline, list(examples.histories), list(examples.targets), rerank=True)
        result[name] = {"lists": len(retrieved), "target_in_candidates": float((retrieved >= 0).mean()),
                        "retrieval": list_metrics(retrieved), "rerank": list_metrics(reranked)}
    return result


def render(results: dict) -> str:
    lines = ["# Reranker ceiling", "", f"Commit {results['commit']}, {results['machine']['date']}, "
             f"load {results['load_average_at_start']}. Made by `bench/rerank_ceiling.py`.", "",
             "Share of lists whose target is among the candidates, and NDCG@10 of retrieval and of the head "
             "(overall, and on the lists whose target is among the candidates).", ""]
    lines += table_header(["run", "train lists with target", "valid", "test", "test retrieval NDCG@10",
                           "test rerank NDCG@10", "gain", "retrieval, target in cands", "rerank, target in cands"],
                          "lrrrrrrrr")
    for name, run in results["runs"].items():
        test = run["test"]
        retrieval, rerank = test["retrieval"]["ndcg@10"], test["rerank"]["ndcg@10"]
        lines.append(table_row([
            name, f"{run['train_target_in_candidates']:.3f} of {run['train_lists']:,}",
            f"{run['valid']['target_in_candidates']:.3f}", f"{test['target_in_candidates']:.3f}",
            f"{retrieval:.4f}", f"{rerank:.4f}", f"{rerank / retrieval - 1:+.1%}" if retrieval else "n/a",
            f"{test['retrieval']['ndcg@10_target_in_candidates']:.4f}", f"{test['rerank']['ndcg@10_target_in_candidates']:.4f}",
        ]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                        help="A finetune output folder and the row name to give it; repeat for several runs.")
    parser.add_argument("--name", default="rerank_ceiling_ml100k", help="Results file stem under bench/results/.")
    arguments = parser.parse_args()
    runs = {}
    for entry in arguments.model:
        name, separator, folder = entry.partition("=")
        if not separator or not name or not folder:
            parser.error(f"--model {entry!r}: give NAME=FOLDER, e.g. --model base=runs/ml100k.")
        started = time.perf_counter()
        runs[name] = measure(Path(folder))
        runs[name]["seconds"] = round(time.perf_counter() - started, 1)
    results = {"commit": git_commit(), "machine": machine(), "load_average_at_start": rounded_load_average(),
               "runs": runs}
    json_path, markdown_path = write_results(arguments.name, results, render(results))
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
