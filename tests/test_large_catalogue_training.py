"""The 1M-item training path: sampled-softmax steps bounded by the batch, chunked stage-2 candidates, encoding from disk."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoTokenizer, BertConfig

from llmrec.config import load_config
from llmrec.data import EvaluationExamples, SequentialSplit
from llmrec.modeling import IGNORE_INDEX, LlmRecConfig, LlmRecForRetrieval, LlmRecModel
from llmrec.modeling.text_encoding import (
    embed_tokenized_items, load_tokenized_items, tokenize_item_texts, tokenize_item_texts_to_disk,
)
from llmrec.training.examples import collate_next_item
from llmrec.training.samplers import NegativeSampler
from llmrec.training.trainer import LlmRecTrainer

NUM_ITEMS = 5000  # far more than any batch touches, so a catalogue-sized tensor stands out


def tiny_model(num_items: int = NUM_ITEMS, **config_kwargs) -> LlmRecModel:
    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = LlmRecConfig(encoder_config=encoder.to_dict(), num_items=num_items, hidden_size=16, max_history_length=8,
                          user_num_heads=2, rerank_num_heads=2, dropout=0.0, **config_kwargs)
    model = LlmRecModel(config)
    with torch.no_grad():
        model.item_text_embeddings[1:].normal_()
    model.warm_items[1 : num_items // 2] = True  # half the catalogue never seen in training
    return model


def sampled_batch(num_items: int = NUM_ITEMS, negatives: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(1, num_items // 2, (6, 9), generator=generator).tolist()
    batch = collate_next_item(windows, max_history_length=8)
    probabilities = torch.ones(num_items + 1).index_fill(0, torch.tensor([0]), 0.0)
    targets = batch["target_item_indices"]
    drawn = NegativeSampler(probabilities / probabilities.sum()).draw(negatives, generator)
    batch["sampled_item_indices"] = torch.unique(torch.cat([targets[targets > 0], drawn]))
    batch["sampled_log_q"] = torch.zeros(len(batch["sampled_item_indices"]))
    return batch


class LargestTensor(TorchDispatchMode):
    """Records the largest dimension of every tensor an op creates (in-place ops write into existing tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not func.overloadpacket.__name__.endswith("_"):
            for tensor in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(tensor, torch.Tensor):
                    size = tensor._nnz() if tensor.is_sparse else max(tensor.shape, default=1)
                    if size > self.largest:
                        self.largest, self.op = size, func.__name__
        return result


def test_sampled_softmax_step_touches_only_the_batch_items():
    model = tiny_model().train()
    model.item_id_embeddings.sparse = True  # as the trainer sets it for large catalogues
    batch = sampled_batch()
    touched = torch.unique(torch.cat([batch["history_item_indices"].flatten(), batch["sampled_item_indices"]]))
    projected = []
    original = model.item_embeddings
    model.item_embeddings = lambda *args, **kwargs: projected.append(original(*args, **kwargs)) or projected[-1]
    with LargestTensor() as spy:
        loss = LlmRecForRetrieval(model, loss="sampled_softmax")(**batch).loss
        loss.backward()
    assert torch.isfinite(loss)
    assert [len(table) for table in projected] == [len(touched) + 1 - int(bool((touched == 0).any()))]
    # Any tensor, index lists included: at most the batch's history and target slots plus the negatives, plus padding.
    bound = batch["history_item_indices"].numel() + batch["target_item_indices"].numel() + len(batch["sampled_item_indices"]) + 1
    assert spy.largest <= bound < NUM_ITEMS, f"{spy.op} made a tensor of {spy.largest} rows"
    assert model.item_id_embeddings.weight.grad.is_sparse


def test_dense_id_gradients_are_caught_by_the_spy():
    """The check above can fail: a dense ID-table gradient has a row per catalogue item."""
    model = tiny_model().train()
    with LargestTensor() as spy:
        LlmRecForRetrieval(model, loss="sampled_softmax")(**sampled_batch()).loss.backward()
    assert spy.largest >= NUM_ITEMS + 1


def _reference_loss(model: LlmRecModel, batch: dict, sampled: bool) -> torch.Tensor:
    """The loss as written before the sampled path was bounded: a catalogue-wide exclusion mask."""
    item_embeddings = model.item_embeddings()
    states = model.encode_users(batch["history_item_indices"], item_embeddings)
    targets_all = batch["target_item_indices"]
    states, targets = states[targets_all != IGNORE_INDEX], targets_all[targets_all != IGNORE_INDEX]
    excluded = (~model.warm_items).clone()
    excluded[0] = True
    excluded[targets] = False
    if not sampled:
        return F.cross_entropy(model.similarity(states, item_embeddings).masked_fill(excluded, float("-inf")), targets)
    columns = batch["sampled_item_indices"]
    logits = model.similarity(states, item_embeddings[columns]) - batch["sampled_log_q"]
    return F.cross_entropy(logits.masked_fill(excluded[columns], float("-inf")), torch.searchsorted(columns, targets))


@pytest.mark.parametrize("sampled", [False, True], ids=["full-softmax", "sampled-softmax"])
def test_losses_equal_the_catalogue_wide_formulation(sampled):
    model = tiny_model(num_items=300).eval()
    batch = sampled_batch(num_items=300)
    if not sampled:
        batch = {key: batch[key] for key in ("history_item_indices", "target_item_indices")}
    with torch.no_grad():
        task = LlmRecForRetrieval(model, loss="sampled_softmax" if sampled else "full_softmax")
        assert torch.equal(task(**batch).loss, _reference_loss(model, batch, sampled))


def test_negative_sampler_draws_what_torch_multinomial_draws():
    popularity = torch.randint(0, 40, (20_001,), generator=torch.Generator().manual_seed(1)).float() ** 2
    probabilities = (popularity + 1).index_fill(0, torch.tensor([0]), 0.0)
    probabilities /= probabilities.sum()
    sampler = NegativeSampler(probabilities)
    for seed in range(5):
        expected = torch.multinomial(probabilities, 1024, replacement=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sampler.draw(1024, torch.Generator().manual_seed(seed)), expected)
    with pytest.raises(ValueError, match="non-negative"):
        NegativeSampler(torch.zeros(10))


def _split(num_items: int) -> SequentialSplit:
    generator = np.random.default_rng(0)
    sequences = generator.integers(1, num_items // 2, size=(40, 8)).tolist()
    valid = EvaluationExamples()
    for user, sequence in enumerate(sequences[:8]):
        valid.add(user, sequence[:-1], sequence[-1])
    return SequentialSplit([f"i{i}" for i in range(num_items)], [f"item {i}" for i in range(num_items)],
                           [f"u{u}" for u in range(40)], [sequence[:-1] for sequence in sequences], valid, EvaluationExamples())


def test_sparse_id_gradients_train_the_id_table_with_sparse_adam(tmp_path):
    from accelerate import Accelerator

    split = _split(400)
    config = load_config(overrides={
        "output_dir": str(tmp_path), "model": {"hidden_size": 16, "max_history_length": 8, "user_num_heads": 2},
        "training": {"loss": "sampled_softmax", "sparse_id_gradients": True, "retrieval_epochs": 1, "rerank_epochs": 0,
                     "retrieval_batch_size": 8, "num_sampled_negatives": 16, "early_stopping_patience": 0},
    })
    model = tiny_model(num_items=400)
    model.warm_items.copy_(torch.as_tensor(split.item_popularity() > 0))
    before = model.item_id_embeddings.weight.detach().clone()
    trainer = LlmRecTrainer(model, split, config, Accelerator(cpu=True), tokenize_placeholder(400))
    assert trainer.use_sparse_id_gradients
    optimizers = trainer._optimizers("retrieval", list(model.parameters()), 1e-3)
    assert [type(optimizer).__name__ for optimizer in optimizers] == ["AdamW", "SparseAdam"]
    stepped = []

    def record(optimizer, *_):
        if isinstance(optimizer, torch.optim.SparseAdam):
            weight = optimizer.param_groups[0]["params"][0]
            stepped.append((weight.grad.is_sparse, bool((weight.detach()[1:200] != before[1:200]).any())))

    handle = register_optimizer_step_post_hook(record)
    try:
        trainer.train_retrieval()
    finally:
        handle.remove()
    assert len(stepped) == 5 and all(sparse and moved for sparse, moved in stepped)  # 40 windows / 8 per step
    assert not trainer.model.item_id_embeddings.sparse  # switched back for full-catalogue use after training
    # By default only catalogues of >= 100k items use it: small runs keep AdamW and their numbers.
    default = load_config(overrides={"training": {"loss": "sampled_softmax"}})
    assert not LlmRecTrainer(model, split, default, Accelerator(cpu=True), tokenize_placeholder(400)).use_sparse_id_gradients


def tokenize_placeholder(num_items: int) -> dict[str, torch.Tensor]:
    """Token tensors for a frozen-encoder trainer, which never reads them during a step."""
    return {"input_ids": torch.zeros(num_items + 1, 2, dtype=torch.long), "attention_mask": torch.ones(num_items + 1, 2, dtype=torch.long)}


def test_stage2_candidates_are_retrieved_in_chunks_in_input_order():
    calls = []

    class RecordingPipeline:
        def retrieve(self, histories, allowed=None):
            calls.append(len(histories))
            return None, np.asarray([[history[-1], len(history)] for history in histories])

    histories = [[position + 1] * (1 + position % 7) for position in range(50)]
    trainer = SimpleNamespace(config=load_config(overrides={"evaluation": {"batch_size": 8}}))
    candidates = LlmRecTrainer._stage2_candidates(trainer, RecordingPipeline(), histories, None)
    assert max(calls) <= 8 and sum(calls) == 50
    assert [row.tolist() for row in candidates] == [[history[-1], len(history)] for history in histories]


def test_tokenising_to_disk_equals_tokenising_in_memory(tmp_path, tiny_encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    texts = [f"movie number {i} genre g{i % 4}" + " about" * (i % 5) for i in range(23)]
    in_memory = tokenize_item_texts(tokenizer, texts, max_length=12)
    on_disk = tokenize_item_texts_to_disk(tokenizer, texts, 12, tmp_path / "tokens", chunk_size=5)
    reopened = load_tokenized_items(tmp_path / "tokens")
    for name in ("input_ids", "attention_mask"):
        assert torch.equal(on_disk[name], in_memory[name]) and torch.equal(reopened[name], in_memory[name])
    with pytest.raises(Exception, match="no complete tokenised catalogue"):
        load_tokenized_items(tmp_path / "missing")


def test_encoding_from_disk_runs_batch_by_batch_and_matches(tmp_path, tiny_encoder_dir):
    model = LlmRecModel.from_encoder(str(tiny_encoder_dir), num_items=23, hidden_size=16, user_num_heads=2, rerank_num_heads=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    texts = [f"movie number {i} genre g{i % 4}" for i in range(23)]
    batch_rows = []

    def recording_encoder(input_ids, attention_mask):
        batch_rows.append(len(input_ids))
        return model.encode_item_texts(input_ids, attention_mask)

    expected = embed_tokenized_items(model, tokenize_item_texts(tokenizer, texts, 12), batch_size=4, show_progress=False)
    on_disk = tokenize_item_texts_to_disk(tokenizer, texts, 12, tmp_path / "tokens", chunk_size=6)
    out = torch.full_like(model.item_text_embeddings, 7.0)
    found = embed_tokenized_items(model, on_disk, batch_size=4, show_progress=False, item_encoder=recording_encoder, out=out)
    assert found is out and torch.equal(found, expected)
    assert max(batch_rows) <= 4 and sum(batch_rows) == 23
    with pytest.raises(ValueError, match="one row per tokenised item"):
        embed_tokenized_items(model, on_disk, out=torch.zeros(3, 3), show_progress=False)


def test_finetune_tokenises_a_large_catalogue_to_disk_with_the_same_results(
    tmp_path, monkeypatch, planted_data_dir, tiny_encoder_dir
):
    """Above the threshold `run_finetune` streams token ids from memory-mapped files, and trains to the same
    numbers as with them in memory; the temporary folder is gone afterwards."""
    import tempfile

    from conftest import tiny_overrides

    from llmrec.finetune import run_finetune
    from llmrec.training import pipeline

    def short_run(name: str) -> dict:
        overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / name)
        overrides["training"].update(retrieval_epochs=2, rerank_epochs=1)
        results = run_finetune(load_config(overrides=overrides))
        return {split: results[split] for split in ("valid", "test")}

    in_memory = short_run("memory")
    folders = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        folders.append(real_mkdtemp(*args, **kwargs))
        return folders[-1]

    monkeypatch.setattr(pipeline, "DISK_TOKENIZATION_MIN_ITEMS", 1)
    monkeypatch.setattr(pipeline.tempfile, "mkdtemp", recording_mkdtemp)
    from_disk = short_run("disk")
    assert len(folders) == 1 and "llmrec-tokens-" in folders[0]
    import gc

    gc.collect()
    assert not Path(folders[0]).exists(), "the temporary token folder was left behind"
    assert from_disk == in_memory
