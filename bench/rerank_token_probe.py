"""Would token-level attention pay in the reranking head? A probe on a trained model, before building it (issue 15).

Each arm trains stage 2 again from a fresh head on the saved model's frozen towers, with the run's own
config, examples, seed and early stopping, and reports valid and test NDCG@10 / HR@10 of retrieval + rerank:

- `head`: today's head (the control: the same training as the run's own stage 2);
- `head + tokens`: the same head, whose scorer also reads a token-level match. Every candidate text token
  (raw MiniLM states, [CLS] and padding left out, at most `--tokens`) attends over the tokens of the user's
  `--history-items` most recent history items, through learned query / key / value projections to
  `--token-size` dimensions; the attended vectors, averaged over the candidate's tokens, join the scorer's
  first layer through weights that start at zero (so the arm starts as the control does).

The token states are computed once with the frozen encoder, as a library version would cache them. If the
token arm does not beat the control on valid, the feature is not built into the library (test is reported,
never used to choose).

    python bench/rerank_token_probe.py --model runs/ml100k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, machine, write_results  # noqa: E402
from bench.rerank_probe_common import (  # noqa: E402
    add_probe_arguments, extend_text_similarity, fresh_head, probe_markdown, train_and_test_head,
)
from llmrec import Recommender  # noqa: E402
from llmrec.config import load_config  # noqa: E402
from llmrec.modeling.text_encoding import tokenize_item_texts  # noqa: E402
from llmrec.training.pipeline import load_split  # noqa: E402


@torch.inference_mode()
def token_states(model, tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_items + 1, T, encoder hidden) raw last-layer states of each item's first `max_tokens` word pieces, and their mask."""
    tokenized = tokenize_item_texts(tokenizer, texts, model.config.max_text_length)
    input_ids, attention_mask = tokenized["input_ids"], tokenized["attention_mask"]
    hidden = model.item_encoder.output_size
    states = torch.zeros(len(input_ids), max_tokens, hidden)
    mask = torch.zeros(len(input_ids), max_tokens, dtype=torch.bool)
    backbone = model.item_encoder.backbone.eval()
    for start in range(1, len(input_ids), 256):
        rows = slice(start, start + 256)
        output = backbone(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).last_hidden_state
        # Left out: [CLS] (position 0) and [SEP] / padding (the mask says which are real; [SEP] is the last real one).
        real = attention_mask[rows].clone()
        real[:, 0] = 0
        real[torch.arange(len(real)), attention_mask[rows].sum(1) - 1] = 0
        for row in range(len(real)):
            positions = torch.nonzero(real[row]).flatten()[:max_tokens]
            states[start + row, : len(positions)] = output[row, positions]
            mask[start + row, : len(positions)] = True
    return states, mask


class TokenMatch(nn.Module):
    """Candidate tokens attend over the recent history items' tokens; returns (B, C, token_size)."""

    def __init__(self, states: torch.Tensor, mask: torch.Tensor, token_size: int, history_items: int) -> None:
        super().__init__()
        self.register_buffer("states", states, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        encoder_size = states.shape[-1]
        generator = torch.Generator().manual_seed(0)  # not the global stream the towers' training reads
        self.query = nn.Parameter(torch.randn(encoder_size, token_size, generator=generator) / encoder_size**0.5)
        self.key = nn.Parameter(torch.randn(encoder_size, token_size, generator=generator) / encoder_size**0.5)
        self.value = nn.Parameter(torch.randn(encoder_size, token_size, generator=generator) / encoder_size**0.5)
        self.history_items = history_items

    def forward(self, candidate_items: torch.Tensor, history_items: torch.Tensor) -> torch.Tensor:
        recent = history_items[:, -self.history_items:]  # left-padded: the most recent items are last
        batch, candidates = candidate_items.shape
        touched, inverse = torch.unique(torch.cat([candidate_items.flatten(), recent.flatten()]), return_inverse=True)
        states = self.states[touched]
        queries, keys, values = states @ self.query, states @ self.key, states @ self.value
        candidate_rows = inverse[: candidate_items.numel()].view(batch, candidates)
        history_rows = inverse[candidate_items.numel():].view(batch, -1)
        query = queries[candidate_rows]  # (B, C, T, d)
        key = keys[history_rows].reshape(batch, -1, keys.shape[-1])  # (B, M*T, d)
        value = values[history_rows].reshape(batch, -1, values.shape[-1])
        key_mask = (self.mask[touched][history_rows] & (recent > 0)[..., None]).reshape(batch, 1, 1, -1)
        logits = torch.einsum("bctd,bkd->bctk", query, key) / query.shape[-1] ** 0.5
        weights = logits.masked_fill(~key_mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        attended = torch.einsum("bctk,bkd->bctd", weights, value)
        query_mask = self.mask[touched][candidate_rows].unsqueeze(-1).to(attended.dtype)  # (B, C, T, 1)
        return (attended * query_mask).sum(2) / query_mask.sum(2).clamp(min=1.0)


def add_token_match(model, states: torch.Tensor, mask: torch.Tensor, token_size: int, history_items: int) -> None:
    """The head's text-similarity input becomes [text similarity, token match] (weights for the latter start at zero)."""
    model.reranker.token_match = TokenMatch(states, mask, token_size, history_items)
    extend_text_similarity(model, token_size, model.reranker.token_match)


def run_arm(folder: Path, tokens: bool, arguments: argparse.Namespace, accelerator: Accelerator) -> dict:
    recommender = Recommender.from_pretrained(folder)
    output_dir = arguments.work_dir / ("tokens" if tokens else "head")
    config = load_config(folder / "config.yaml", [f"--output_dir={output_dir}", *arguments.overrides])
    model = recommender.model
    split = load_split(config)
    fresh_head(model, config.training.seed)
    if tokens:
        states, mask = token_states(model, recommender.tokenizer, split.item_texts, arguments.tokens)
        add_token_match(model, states, mask, arguments.token_size, arguments.history_items)
    return train_and_test_head(recommender, split, config, accelerator)


def render(report: dict) -> str:
    return probe_markdown("Token-level attention in the reranking head: a probe (issue 15)", "rerank_token_probe.py", report,
                          "the token arm's head also reads candidate-token over history-token attention.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_probe_arguments(parser, "/tmp/llmrec-token-probe", "rerank_token_probe_ml100k")
    parser.add_argument("--tokens", type=int, default=16, help="Word pieces per item text.")
    parser.add_argument("--token-size", type=int, default=32, help="Query / key / value size of the token attention.")
    parser.add_argument("--history-items", type=int, default=6, help="Most recent history items whose tokens are read.")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    accelerator = Accelerator(cpu=True)
    folders = dict(spec.split("=", 1) for spec in arguments.model)
    models = {}
    for name, folder in folders.items():
        models[name] = {arm: run_arm(Path(folder), arm == "head + tokens", arguments, accelerator)
                        for arm in ("head", "head + tokens")}
    settings = f"tokens {arguments.tokens}, token size {arguments.token_size}, history items {arguments.history_items}"
    settings += "".join(f", {override}" for override in arguments.overrides)
    report = {"commit": git_commit(), "machine": machine(), "settings": settings, "models": models, "folders": folders}
    _, markdown_path = write_results(arguments.name, report, render(report))
    print(markdown_path.read_text())


if __name__ == "__main__":
    main()
