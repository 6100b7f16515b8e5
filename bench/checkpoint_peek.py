"""Retrieval quality of a stopped or still-running training's best weights so far, read from its newest checkpoint.

A stage-1 checkpoint holds `best_state.safetensors`, the trainable weights of the best validation epoch so
far. This scores them on valid and test the way the run's own evaluation does (full ranking over the
catalogue by the towers' cosine, history removed) without touching the run, so a run too long for one
session still gives a test figure, labelled with the epoch it stood at. The frozen encoder's catalogue
cache is rebuilt from the config (it is not in the checkpoint).

    python bench/checkpoint_peek.py --config configs/ml1m.yaml --checkpoint runs/ml1m/checkpoints/retrieval-step-4050 \
        --name quality_ml1m_seed42_checkpoint
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, machine, write_results  # noqa: E402
from llmrec.config import load_config  # noqa: E402
from llmrec.evaluation import evaluate_ranking  # noqa: E402
from llmrec.modeling import LlmRecModel  # noqa: E402
from llmrec.modeling.histories import pad_histories  # noqa: E402
from llmrec.training.pipeline import _new_model, load_split, resolve_encoder  # noqa: E402


def build_model(config, split) -> LlmRecModel:
    """The run's model before training, with its catalogue encoded (the frozen encoder's cache), as the run built it."""
    encoder_path = resolve_encoder(config)
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    model, _ = _new_model(config, encoder_path, split, tokenizer, Accelerator(cpu=True), "fp32")
    return model


def load_best_state(model: LlmRecModel, checkpoint: Path) -> None:
    """The checkpoint's best weights into `model`; every one of them must land on a parameter."""
    best = load_file(checkpoint / "best_state.safetensors")
    best = {name.removeprefix("llmrec."): tensor for name, tensor in best.items()}
    unknown = sorted(set(best) - set(model.state_dict()))
    if unknown:
        raise SystemExit(f"{checkpoint}: best_state names no parameter of this model: {unknown[:5]}")
    model.load_state_dict(best, strict=False)


@torch.no_grad()
def retrieval_scores(model: LlmRecModel):
    items = model.item_embeddings()
    window = model.config.max_history_length

    def score(histories: list[list[int]]) -> torch.Tensor:
        users = model.encode_users(pad_histories(histories, window), items, last_only=True)[:, -1]
        return model.similarity(users, items)

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", type=Path, required=True, help="A retrieval-step-N folder.")
    parser.add_argument("--override", dest="overrides", action="append", default=[], help="Config override (repeatable).")
    parser.add_argument("--ks", nargs="+", type=int, default=[10, 20, 100])
    parser.add_argument("--name", required=True, help="Results file stem under bench/results/.")
    arguments = parser.parse_args()
    state = json.loads((arguments.checkpoint / "trainer_state.json").read_text())
    config = load_config(arguments.config, arguments.overrides)
    split = load_split(config)
    model = build_model(config, split).eval()
    load_best_state(model, arguments.checkpoint)
    score = retrieval_scores(model)
    results = {split_name: evaluate_ranking(score, examples.histories, examples.targets, split.num_items, ks=arguments.ks,
                                            desc=split_name)
               for split_name, examples in (("valid", split.valid), ("test", split.test))}
    progress = state["progress"]
    where = (f"{progress['stage']} stage, epoch {progress['epoch']} under way ({progress['batches_done']} batches), "
             f"best valid epoch so far {progress['best_metrics'].get('epoch')}")
    report = {"commit": git_commit(), "machine": machine(), "checkpoint": str(arguments.checkpoint), "where": where,
              "progress": progress, "config": arguments.config, "overrides": arguments.overrides,
              "retrieval": results}
    lines = [f"# Best weights so far of {arguments.checkpoint.name}", "",
             f"Commit {report['commit']}, {report['machine']['date']}; `{arguments.config}` "
             f"{' '.join(arguments.overrides)}; {where}.", "",
             "| split | " + " | ".join(f"NDCG@{k} | HR@{k}" for k in arguments.ks) + " |",
             "| --- |" + " ---: | ---: |" * len(arguments.ks)]
    for split_name, metrics in results.items():
        lines.append(f"| {split_name} | " + " | ".join(f"{metrics[f'ndcg@{k}']:.4f} | {metrics[f'hr@{k}']:.4f}"
                                                      for k in arguments.ks) + " |")
    _, markdown_path = write_results(arguments.name, report, "\n".join(lines) + "\n")
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
