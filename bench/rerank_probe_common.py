"""What the reranking-head probes share: a fresh head, stage 2 trained again on frozen towers, and the table.

A probe (`rerank_token_probe.py`, `rerank_cooccurrence_probe.py`) adds one input to the head of a trained
model and compares it with the head as it is, each arm trained from the same fresh head with the run's own
config, examples, seed and early stopping.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from bench.common import table_header, table_row
from llmrec.evaluation import evaluate_ranking
from llmrec.modeling.reranker import CrossAttentionReranker, text_similarity_features
from llmrec.modeling.text_encoding import tokenize_item_texts
from llmrec.training.ranking import rerank_score_function
from llmrec.training.trainer import LlmRecTrainer


def fresh_head(model, seed: int) -> None:
    """Today's head as a new run starts it: random attention and MLP, scorer output and feature weights at zero."""
    torch.manual_seed(seed)
    head = CrossAttentionReranker(model.config)
    for module in head.modules():
        model._init_weights(module)
    nn.init.zeros_(head.scorer[-1].weight)
    nn.init.zeros_(head.scorer[-1].bias)
    model.reranker = head.to(model.item_text_embeddings.device)


def train_and_test_head(recommender, split, config, accelerator: Accelerator) -> dict:
    """Stage 2 on the model's frozen towers; the best valid epoch's NDCG@10 / HR@10, and test's, and the time."""
    model = recommender.model
    tokenized = tokenize_item_texts(recommender.tokenizer, split.item_texts, config.model.max_text_length)
    trainer = LlmRecTrainer(model, split, config, accelerator, tokenized)
    started = time.perf_counter()
    best_valid = trainer.train_reranker()
    seconds = time.perf_counter() - started
    model.eval()
    pipeline = trainer.candidate_pipeline()
    test = evaluate_ranking(rerank_score_function(pipeline, split.num_items), split.test.histories, split.test.targets,
                            split.num_items, ks=[10])
    return {"valid": {name: best_valid[name] for name in ("ndcg@10", "hr@10")}, "best_epoch": best_valid.get("epoch"),
            "test": {name: test[name] for name in ("ndcg@10", "hr@10")}, "stage2_seconds": round(seconds, 1)}


def probe_table(models: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown rows: one per (model, arm)."""
    lines = table_header(["model", "arm", "valid NDCG@10", "valid HR@10", "test NDCG@10", "test HR@10", "best epoch",
                          "stage-2 s"], "llrrrrrr")
    for name, arms in models.items():
        for arm, result in arms.items():
            lines.append(table_row([name, arm, f"{result['valid']['ndcg@10']:.4f}", f"{result['valid']['hr@10']:.4f}",
                                    f"{result['test']['ndcg@10']:.4f}", f"{result['test']['hr@10']:.4f}",
                                    result["best_epoch"], result["stage2_seconds"]]))
    return lines


def extend_text_similarity(model, extra_size: int, extra_features) -> None:
    """Make the head read `extra_features(candidate items, history items)` (B, C, extra_size) beside its text similarity.

    The features take catalogue item indices; they join the scorer's first layer through new weights that start
    at zero (no random draw), so the extended head starts as the control's does.
    """
    reranker = model.reranker
    old = reranker.text_similarity_weight
    reranker.text_similarity_weight = nn.Parameter(torch.cat([old.detach(), torch.zeros(old.shape[0], extra_size)], dim=1))

    def text_similarity(candidate_item_indices, history_item_indices, row_items):
        items = (lambda rows: rows) if row_items is None else (lambda rows: row_items[rows])
        table = model.item_text_embeddings if row_items is None else model.item_text_embeddings[row_items]
        pooled = text_similarity_features(table[candidate_item_indices], table[history_item_indices], history_item_indices > 0)
        extra = extra_features(items(candidate_item_indices), items(history_item_indices))
        return torch.cat([pooled, extra.to(pooled)], dim=-1)

    model._text_similarity = text_similarity


def add_probe_arguments(parser, work_dir: str, name: str) -> None:
    """The options every probe takes: the trained models, threads, config overrides, where to write."""
    parser.add_argument("--model", nargs="+", required=True, help="NAME=FOLDER of trained models.")
    parser.add_argument("--work-dir", type=Path, default=Path(work_dir), help="Checkpoint folders.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--override", dest="overrides", action="append", default=[],
                        help="A config override, e.g. --override=--training.rerank_epochs=2 (repeatable).")
    parser.add_argument("--name", default=name, help="Results file stem under bench/results/.")


def probe_markdown(title: str, script: str, report: dict, arm_description: str) -> str:
    """The results page: what ran where, then the table."""
    settings = f" ({report['settings']})" if report["settings"] else ""
    lines = [f"# {title}", "",
             f"Commit {report['commit']}, {report['machine']['date']}, load {report['machine'].get('load_average_at_start')}. "
             f"Made by `bench/{script}`{settings}: stage 2 trained again from a fresh head on each saved model's frozen "
             f"towers; {arm_description}", ""]
    return "\n".join(lines + probe_table(report["models"])) + "\n"
