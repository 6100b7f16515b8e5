"""Would item-to-item co-occurrence pay in the reranking head? A probe on trained models, before building it (issue 15).

Same protocol as `bench/rerank_token_probe.py`: each arm trains stage 2 again from a fresh head on the saved
model's frozen towers, with the run's own config, examples, seed and early stopping, and reports valid and
test NDCG@10 / HR@10 of retrieval + rerank:

- `head`: today's head (the control: the same training as the run's own stage 2);
- `head + co-occurrence`: the same head, whose scorer also reads each candidate's co-occurrence cosine with
  the history items (max, mean and most recent, as the text-similarity features are built), counted over the
  training sequences: count(h, c) / sqrt(count(h) count(c)), users who hold both items counted once each.

**The user's own interactions are left out of the counts** for every example, training, validation and test
alike. Stage 2 trains on positions of the training sequences, and every one of those targets co-occurs with
its own history in the counts; a validation or test target never does. Left in, the feature would mark the
training targets, which is the "easier training lists than serving lists" cause the issue names, and the
head would learn to trust it where serving has no such signal. The user of an example is found from its
history (the window's items, which are unique per user here).

The new weights start at zero and take no random draw, so the arm starts as the control does. If the arm does
not beat the control on valid, the feature is not built into the library (test is reported, never used to choose).

    python bench/rerank_cooccurrence_probe.py --model 42=runs/ml100k --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, machine, write_results  # noqa: E402
from bench.rerank_probe_common import (  # noqa: E402
    add_probe_arguments, extend_text_similarity, fresh_head, probe_markdown, train_and_test_head,
)
from llmrec import Recommender  # noqa: E402
from llmrec.config import load_config  # noqa: E402
from llmrec.training.pipeline import load_split  # noqa: E402

ARMS = ("head", "head + co-occurrence")
COOCCURRENCE_FEATURES = 3


class LeaveUserOutCooccurrence:
    """Co-occurrence cosines between candidates and history items, with the example's own user left out."""

    def __init__(self, train_sequences: list[list[int]], num_items: int, window: int) -> None:
        owned = torch.zeros(len(train_sequences), num_items + 1)
        for user, sequence in enumerate(train_sequences):
            owned[user, list(set(sequence))] = 1.0
        self.owned = owned
        self.counts = owned.T @ owned  # (items + 1, items + 1); the diagonal holds each item's user count
        self.item_counts = self.counts.diagonal().clone()
        self.window = window
        self.user_of: dict[tuple[int, ...], int | None] = {}  # None: a window two users share
        for user, sequence in enumerate(train_sequences):
            for end in range(1, len(sequence) + 1):
                key = tuple(sequence[max(0, end - window): end])
                self.user_of[key] = user if self.user_of.get(key, user) == user else None

    def register(self, histories: list[list[int]], users: list[int]) -> None:
        """Histories (valid, test) whose user the training prefixes do not name, e.g. train + valid items."""
        for history, user in zip(histories, users):
            self.user_of[tuple(history[-self.window:])] = user

    def users(self, history_items: torch.Tensor) -> torch.Tensor:
        keys = [tuple(int(item) for item in row if item > 0) for row in history_items.tolist()]
        users = [self.user_of.get(key) for key in keys]
        if None in users:
            raise RuntimeError("A history matches no user, or two; the probe cannot leave its user out.")
        return torch.tensor(users)

    def __call__(self, candidate_items: torch.Tensor, history_items: torch.Tensor) -> torch.Tensor:
        """(B, C, 3): max, mean and most recent co-occurrence cosine of each candidate with the history."""
        own = self.owned[self.users(history_items)]  # (B, items + 1)
        own_candidate = own.gather(1, candidate_items)[:, :, None]  # (B, C, 1)
        own_history = own.gather(1, history_items)[:, None, :]  # (B, 1, L)
        together = self.counts[candidate_items[:, :, None], history_items[:, None, :]] - own_candidate * own_history
        norm = ((self.item_counts[candidate_items][:, :, None] - own_candidate).clamp(min=1.0)
                * (self.item_counts[history_items][:, None, :] - own_history).clamp(min=1.0)).sqrt()
        cosines = together.clamp(min=0.0) / norm
        mask = (history_items > 0)[:, None, :]
        count = mask.sum(-1).clamp(min=1)
        best = cosines.masked_fill(~mask, 0.0).amax(-1)
        mean = cosines.masked_fill(~mask, 0.0).sum(-1) / count
        latest = cosines[..., -1] * mask[..., -1]
        return torch.stack([best, mean, latest], dim=-1)


def run_arm(folder: Path, arm: str, arguments: argparse.Namespace, accelerator: Accelerator) -> dict:
    recommender = Recommender.from_pretrained(folder)
    output_dir = arguments.work_dir / f"{folder.name}-{'cooccurrence' if arm != 'head' else 'head'}"
    config = load_config(folder / "config.yaml", [f"--output_dir={output_dir}", *arguments.overrides])
    model = recommender.model
    split = load_split(config)
    fresh_head(model, config.training.seed)
    if arm != "head":
        features = LeaveUserOutCooccurrence(split.train_sequences, split.num_items, config.model.max_history_length)
        for examples in (split.valid, split.test):
            features.register(examples.histories, examples.user_indices)
        extend_text_similarity(model, COOCCURRENCE_FEATURES, lambda candidates, history: features(candidates.cpu(), history.cpu()))
    return train_and_test_head(recommender, split, config, accelerator)


def render(report: dict) -> str:
    return probe_markdown("Item co-occurrence in the reranking head: a probe (issue 15)", "rerank_cooccurrence_probe.py",
                          report, "the co-occurrence arm's head also reads each candidate's co-occurrence cosine with the "
                          "history items (max, mean, most recent), the example's own user left out of the counts.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_probe_arguments(parser, "/tmp/llmrec-cooccurrence-probe", "rerank_cooccurrence_probe_ml100k")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    accelerator = Accelerator(cpu=True)
    folders = dict(spec.split("=", 1) for spec in arguments.model)
    models = {name: {arm: run_arm(Path(folder), arm, arguments, accelerator) for arm in arguments.arms}
              for name, folder in folders.items()}
    settings = ", ".join(arguments.overrides)
    report = {"commit": git_commit(), "machine": machine(), "settings": settings, "models": models, "folders": folders}
    _, markdown_path = write_results(arguments.name, report, render(report))
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
