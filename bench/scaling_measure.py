"""The timings and sizes bench/scaling.py records: latency and throughput of each stage, memory, ANN recall."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from llmrec.retrieval import CandidatePipeline, ItemIndex
from llmrec.retrieval.index import SEARCH_PARAMS, resolve_index_params
from scaling_synthetic import TOP_K, RealModel

logger = logging.getLogger("bench.scaling")




RECALL_TARGET = 0.95


LATENCY_TARGET_MS = 5.0


HNSW_EF_SEARCH = [100, 128, 160, 200, 256, 320, 400, 512]


IVF_NPROBE = [4, 8, 12, 16, 24, 32, 48, 64, 96, 128]


def time_calls(call: Callable[[int], Any], repeats: int, warmup: int) -> dict:
    """Warm-up calls, then p50 / p99 / mean milliseconds of `repeats` calls; `call(i)` gets the call number."""
    for position in range(warmup):
        call(position)
    elapsed = np.empty(repeats)
    for position in range(repeats):
        started = time.perf_counter()
        call(warmup + position)
        elapsed[position] = time.perf_counter() - started
    elapsed *= 1e3
    return {
        "p50_ms": round(float(np.median(elapsed)), 4),
        "p99_ms": round(float(np.percentile(elapsed, 99)), 4),
        "mean_ms": round(float(elapsed.mean()), 4),
        "repeats": repeats,
    }


def batch_qps(call: Callable[[int], Any], batch_size: int, repeats: int) -> float:
    """Users per second of a batched call (median of `repeats` calls after one warm-up)."""
    timing = time_calls(call, max(3, repeats), warmup=1)
    return round(batch_size / (timing["p50_ms"] / 1e3), 1)


def rss_bytes() -> dict:
    """Current and peak resident set size of this process (Linux /proc)."""
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _unit = line.split()
                values["rss_bytes" if name == "VmRSS:" else "peak_rss_bytes"] = int(amount) * 1024
    except OSError:
        pass
    return values


def tensor_bytes(holder: object) -> int:
    """Bytes of the tensors an object holds directly or one level down (e.g. a pipeline and its caches)."""
    total = 0
    for value in vars(holder).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, ItemIndex, type)):
            total += sum(item.numel() * item.element_size() for item in vars(value).values() if isinstance(item, torch.Tensor))
    return total


def model_item_table_bytes(real: RealModel, num_items: int) -> int:
    """Bytes the full model's per-item tables would take at `num_items` (BERT text embeddings, ID embeddings)."""
    model = real.recommender.model
    per_item = model.item_text_embeddings[1:2].numel() * model.item_text_embeddings.element_size()
    if getattr(model, "item_id_embeddings", None) is not None:
        per_item += model.item_id_embeddings.weight.shape[1] * model.item_id_embeddings.weight.element_size()
    return int(per_item * (num_items + 1))


def build_index(item_vectors: np.ndarray, index_type: str, params: dict, cache_dir: Path | None) -> tuple[ItemIndex, float]:
    """Build (or load from the cache) an index; returns it and its build seconds (of the original build)."""
    key = hashlib.sha1(item_vectors.tobytes())
    key.update(json.dumps([index_type, params], sort_keys=True).encode())
    path = cache_dir / f"{index_type}-{len(item_vectors)}-{key.hexdigest()[:16]}.faiss" if cache_dir else None
    if path is not None and path.is_file():
        index = ItemIndex.load(path)
        # The cache is keyed by build parameters; search parameters are today's defaults, not those saved with it.
        resolved = resolve_index_params(index_type, params)
        index.set_search_params(**{name: resolved[name] for name in SEARCH_PARAMS[index_type]})
        build_seconds = json.loads(path.with_suffix(".build.json").read_text())["build_seconds"]
        logger.info("Loaded cached %r (built in %.1f s)", index, build_seconds)
        return index, build_seconds
    started = time.perf_counter()
    index = ItemIndex.build(item_vectors, normalize=True, index_type=index_type, **params)
    build_seconds = round(time.perf_counter() - started, 2)
    logger.info("Built %r in %.1f s", index, build_seconds)
    if path is not None and index_type != "flat":  # flat builds in a second; HNSW takes minutes at 1M
        path.parent.mkdir(parents=True, exist_ok=True)
        index.save(path)
        path.with_suffix(".build.json").write_text(json.dumps({"build_seconds": build_seconds}))
    return index, build_seconds


def index_bytes(index: ItemIndex) -> int:
    """Size of the serialised FAISS index: what it occupies on disk and, near enough, in memory."""
    return int(faiss.serialize_index(index.faiss_index).nbytes)


def measure_user_encoding(pipeline: CandidatePipeline, histories: list[list[int]], repeats: int, warmup: int) -> dict:
    """The user tower on one history per call (independent of the catalogue size)."""
    return time_calls(lambda call: pipeline.user_embeddings([histories[call % len(histories)]]), repeats, warmup)


def measure_retrieval(
    pipeline: CandidatePipeline, histories: list[list[int]], user_vectors: np.ndarray, repeats: int, warmup: int, batch_size: int
) -> dict:
    """FAISS top-100 with the history excluded, one user per call and batched; and the user tower + FAISS."""
    index = pipeline.index

    def faiss_one(call: int) -> None:
        user = call % len(histories)
        index.search(user_vectors[user : user + 1], TOP_K, exclude=[histories[user]])

    batch = [position % len(histories) for position in range(batch_size)]
    batch_vectors, batch_histories = user_vectors[batch], [histories[user] for user in batch]
    return {
        "faiss": time_calls(faiss_one, repeats, warmup),
        "faiss_batch_qps": batch_qps(lambda _: index.search(batch_vectors, TOP_K, exclude=batch_histories), batch_size, repeats // 20),
        "tower_and_faiss": time_calls(lambda call: pipeline.retrieve([histories[call % len(histories)]], TOP_K), repeats, warmup),
    }


def measure_rerank(
    pipeline: CandidatePipeline, histories: list[list[int]], user_vectors: np.ndarray, repeats: int, warmup: int, batch_size: int
) -> dict:
    """The cross-attention head on 100 retrieved candidates, user embedding given (as retrieve_and_rerank does)."""
    _, candidates = pipeline.index.search(user_vectors, TOP_K, exclude=histories)
    users = torch.from_numpy(user_vectors)

    def rerank_one(call: int) -> None:
        user = call % len(histories)
        pipeline.rerank([histories[user]], candidates[user : user + 1], user_embeddings=users[user : user + 1])

    batch = [position % len(histories) for position in range(batch_size)]
    batch_histories, batch_candidates, batch_users = [histories[user] for user in batch], candidates[batch], users[batch]
    return {
        "rerank": time_calls(rerank_one, repeats, warmup),
        "rerank_batch_qps": batch_qps(
            lambda _: pipeline.rerank(batch_histories, batch_candidates, user_embeddings=batch_users), batch_size, repeats // 20
        ),
    }


def measure_memory(real: RealModel, pipeline: CandidatePipeline, index: ItemIndex) -> dict:
    """Index bytes, the pipeline's per-item caches, what the full model's item tables would take, and process RSS."""
    return {
        "index_bytes": index_bytes(index),
        "pipeline_item_cache_bytes": tensor_bytes(pipeline),
        "model_item_tables_bytes": model_item_table_bytes(real, index.num_items),
        **rss_bytes(),
    }


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top-k (ignoring padding) that the approximate search returned."""
    shares = [len(np.intersect1d(row[row > 0], exact[exact > 0])) / max(1, int((exact > 0).sum())) for row, exact in zip(found, truth)]
    return round(float(np.mean(shares)), 4)


def measure_ann_sweep(
    indexes: dict[str, ItemIndex], user_vectors: np.ndarray, histories: list[list[int]], repeats: int, warmup: int
) -> list[dict]:
    """Recall@100 against flat and latency of every efSearch (HNSW) / nprobe (IVF) setting, history excluded."""
    _, truth = indexes["flat"].search(user_vectors, TOP_K, exclude=histories)
    sweeps = {"flat": [("exact", None)], "hnsw": [("efSearch", value) for value in HNSW_EF_SEARCH],
              "ivf": [("nprobe", value) for value in IVF_NPROBE]}
    rows = []
    for index_type, settings in sweeps.items():
        index = indexes.get(index_type)
        if index is None:
            continue
        original = dict(index.params)
        for name, value in settings:
            if value is not None:
                index.set_search_params(**{name: value})
            _, found = index.search(user_vectors, TOP_K, exclude=histories)

            def one(call: int) -> None:
                user = call % len(histories)
                index.search(user_vectors[user : user + 1], TOP_K, exclude=[histories[user]])

            timing = time_calls(one, repeats, warmup)
            qps = batch_qps(lambda _: index.search(user_vectors, TOP_K, exclude=histories), len(histories), max(3, repeats // 50))
            rows.append({"index_type": index_type, "param": name, "value": value, "recall_at_100": recall_at_k(found, truth),
                         "p50_ms": timing["p50_ms"], "p99_ms": timing["p99_ms"], "batch_qps": qps})
            logger.info("sweep %s", rows[-1])
        index.set_search_params(**{name: original[name] for name in index.params if name in ("efSearch", "nprobe")})
    return rows


def best_settings(rows: list[dict]) -> dict:
    """Per index type, the fastest (p50) setting with recall@100 >= 0.95, and whether it meets the latency target."""
    best = {}
    for index_type in dict.fromkeys(row["index_type"] for row in rows):
        passing = [row for row in rows if row["index_type"] == index_type and row["recall_at_100"] >= RECALL_TARGET]
        choice = min(passing, key=lambda row: row["p50_ms"]) if passing else None
        best[index_type] = None if choice is None else {**choice, "meets_target": choice["p50_ms"] <= LATENCY_TARGET_MS}
    return best
