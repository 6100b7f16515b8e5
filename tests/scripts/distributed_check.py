"""Run under `accelerate launch` (2 processes): distributed encoding and evaluation against one process.

Every process computes the catalogue cache, the metrics and the top-10 lists twice, with the run's accelerator and with
none (the one-process path), and writes both to `<out>/rank<r>.json` for tests/test_distributed.py to compare.
Item and user counts are chosen so the batches do not divide evenly, and one case leaves a process empty.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

from llmrec.evaluation import evaluate_ranking
from llmrec.modeling import LlmRecModel
from llmrec.modeling.text_encoding import embed_tokenized_items, tokenize_item_texts

NUM_ITEMS = 41  # 11 batches of 4: 6 on one process, 5 on the other
NUM_USERS = 27  # 7 batches of 4


def main(encoder_dir: str, out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlmRecModel.from_encoder(
        encoder_dir, num_items=NUM_ITEMS, num_candidates=10, hidden_size=32, max_history_length=16, max_text_length=16,
        user_num_heads=2, rerank_num_heads=2,
    )
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    texts = [f"movie number {item} " + f"genre g{item % 4} " * (item % 5) for item in range(NUM_ITEMS)]
    tokenized = tokenize_item_texts(tokenizer, texts, 16)
    report: dict = {"rank": accelerator.process_index, "num_processes": accelerator.num_processes, "cache": {}, "metrics": {},
                    "top_items": {}}
    for batch_size in (4, 64):  # 64: one batch, so the second process encodes nothing
        local = embed_tokenized_items(model, tokenized, batch_size, show_progress=False)
        shared = embed_tokenized_items(model, tokenized, batch_size, show_progress=False, accelerator=accelerator)
        report["cache"][str(batch_size)] = {
            "max_abs_difference": float((local - shared).abs().max()), "zero_row_0": bool((shared[0] == 0).all()),
            "rows": len(shared), "nonzero_rows": int((shared.abs().sum(dim=1) > 0).sum()),
        }
    table = local.float()
    rng = random.Random(1)
    histories = [[rng.randrange(1, NUM_ITEMS + 1) for _ in range(rng.randrange(1, 9))] for _ in range(NUM_USERS)]
    targets = [rng.randrange(1, NUM_ITEMS + 1) for _ in range(NUM_USERS)]

    def score(batch_histories: list[list[int]]) -> torch.Tensor:
        users = torch.stack([table[torch.as_tensor(history)].mean(dim=0) for history in batch_histories])
        scores = users @ table.T
        scores[:, 0] = float("-inf")
        return scores

    for name, users, batch_size in (("uneven", NUM_USERS, 4), ("one_batch", 3, 4), ("one_user_each", 2, 1)):
        local_top, distributed_top = torch.zeros((users, 10), dtype=torch.long), torch.zeros((users, 10), dtype=torch.long)
        report["metrics"][name] = {
            "local": evaluate_ranking(score, histories[:users], targets[:users], NUM_ITEMS, batch_size=batch_size,
                                      top_items_out=local_top),
            "distributed": evaluate_ranking(
                score, histories[:users], targets[:users], NUM_ITEMS, batch_size=batch_size, accelerator=accelerator,
                top_items_out=distributed_top,
            ),
        }
        report["top_items"][name] = {"local": local_top.tolist(), "distributed": distributed_top.tolist()}
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
