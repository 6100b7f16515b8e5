"""IVF-PQ through `ItemIndex` (retrieval.index_factory) against exact search, on memory-mapped synthetic vectors.

For each catalogue size and factory string, one build is measured and then swept at search time:

- build time, split into training (on a random sample of up to 262,144 vectors, as `ItemIndex` does) and
  filling (chunks of 65,536 read from a memory-mapped .npy file, so only a sample and a chunk are in memory);
- bytes per vector of the index as saved (codes, ids, lists, quantizers; what a model folder pays per item);
- recall@100 against the exact top 100 (|found ∩ exact| / 100, averaged over the queries);
- p50 latency of one query per call (`ItemIndex.search(query[None], 100)`, after a warm-up), with the
  FAISS threads given (default 1: a serving process answers many users at once);

over every nprobe of `--nprobe` and, for factory strings with a refine stage, every `--k-factor`.

Vectors (64-d, cosine): a hierarchical, clustered catalogue like trained item embeddings, not uniform noise
(the ANN worst case). 32 "genres" lie at random on the unit sphere; each of n/2,000 "niches" sits near one
genre, with Zipf-distributed sizes (exponent 1.1, so a few niches are large and most are small); an item is
its niche's centre plus noise along 4 niche-specific directions (local dimension ~4, like the trained
MovieLens-100k item vectors' neighbourhoods in `bench/scaling.py`) plus a smaller isotropic part, then
normalised. Queries are user-like: the normalised mean of 8 fresh items from one or two niches. Exact top
100 comes from `faiss.knn` over the memory map in chunks, merged with `faiss.ResultHeap`.

    python bench/ivfpq.py --sizes 100000 --queries 100 --nprobe 16 64 --factory IVF1024,PQ32x10np \
        --out /tmp/ivfpq_smoke.json                          # smoke: ~1 min on 2 loaded cores
    python bench/ivfpq.py --sizes 1000000 5000000 --threads 2   # full: ~30-45 min, ~1.5 GB of vectors in runs/ivfpq/
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llmrec.retrieval import ItemIndex  # noqa: E402
from llmrec.retrieval import factory as large  # noqa: E402

logger = logging.getLogger("bench.ivfpq")
DIM, TOP_K, GENRES, LOCAL_DIM, ITEMS_PER_NICHE = 64, 100, 32, 4, 2_000
LOCAL_NOISE, ISOTROPIC_NOISE = 0.175, 0.12  # local: 4 directions of norm ~1 each, so ~0.35 in all
GENERATE_CHUNK, TRUTH_CHUNK = 262_144, 524_288
# Factory strings that fit 64 bytes per item with their ids (8 bytes) and ItemIndex's direct map (8 bytes, for
# exact fallbacks): residual PQ with 32 sub-quantizers of 10 bits (40 code bytes: 56 in all) and of 8 bits
# (32: 48 in all). "np": no polysemous training, which FAISS's factory does by default for IVF-PQ and which
# only serves Hamming filtering (unused here); it made training 17x slower in the 100k smoke (194 s vs 11 s).
# IVF16384_HNSW32: 4x the lists (smaller residuals, shorter lists to scan at 5M) with an HNSW coarse quantizer, so
# filling 5M vectors does not pay 16,384 exact centroid distances each; its 262,144-vector training sample
# gives 16 per list, under FAISS's advised 39 (it warns), a trade against hours of k-means.
DEFAULT_FACTORIES = ("IVF4096,PQ32x10np", "IVF16384_HNSW32,PQ32x10np", "IVF4096,PQ32np")


class Catalogue:
    """The synthetic distribution: genre and niche centres plus each niche's local directions."""

    def __init__(self, num_items: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        genres = _unit(rng.standard_normal((GENRES, DIM)))
        num_niches = max(GENRES, num_items // ITEMS_PER_NICHE)
        parents = rng.integers(GENRES, size=num_niches)
        self.centres = _unit(genres[parents] + 0.6 * _unit(rng.standard_normal((num_niches, DIM))))
        self.directions = rng.standard_normal((num_niches, LOCAL_DIM, DIM)).astype(np.float32) / np.sqrt(DIM)
        weights = 1.0 / np.arange(1, num_niches + 1) ** 1.1
        self.niche_weights = rng.permutation(weights / weights.sum())

    def items(self, rng: np.random.Generator, niches: np.ndarray) -> np.ndarray:
        # Noise norms ~0.35 along the niche's directions and ~0.12 in every direction, against a centre of norm 1.
        local = np.einsum("nl,nld->nd", rng.standard_normal((len(niches), LOCAL_DIM)).astype(np.float32), self.directions[niches])
        isotropic = rng.standard_normal((len(niches), DIM)).astype(np.float32) / np.sqrt(DIM)
        return _unit(self.centres[niches] + LOCAL_NOISE * local + ISOTROPIC_NOISE * isotropic)

    def queries(self, rng: np.random.Generator, count: int, per_query: int = 8) -> np.ndarray:
        first = rng.choice(len(self.centres), size=count, p=self.niche_weights)
        second = np.where(rng.random(count) < 0.5, first, rng.choice(len(self.centres), size=count, p=self.niche_weights))
        niches = np.where(np.arange(per_query)[None, :] < per_query // 2, first[:, None], second[:, None]).ravel()
        return _unit(self.items(rng, niches).reshape(count, per_query, DIM).mean(axis=1))


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def memory_mapped_items(catalogue: Catalogue, num_items: int, folder: Path, seed: int) -> np.ndarray:
    """The catalogue written chunk by chunk to `folder` (reused when present), opened read-only."""
    path = folder / f"items_{num_items}_seed{seed}.npy"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        table = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(num_items, DIM))
        rng = np.random.default_rng(seed + 1)
        for start in range(0, num_items, GENERATE_CHUNK):
            stop = min(start + GENERATE_CHUNK, num_items)
            table[start:stop] = catalogue.items(rng, rng.choice(len(catalogue.centres), size=stop - start, p=catalogue.niche_weights))
        table.flush()
        del table
        partial.rename(path)
    return np.load(path, mmap_mode="r")


def exact_top_k(items: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Rows of the exact top 100 per query, scanning the memory map in chunks (one chunk in memory)."""
    heap = faiss.ResultHeap(len(queries), TOP_K, keep_max=True)
    for start in range(0, len(items), TRUTH_CHUNK):
        chunk = np.ascontiguousarray(items[start:start + TRUTH_CHUNK])
        scores, rows = faiss.knn(queries, chunk, min(TOP_K, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, rows + start)
    heap.finalize()
    return heap.I


def build(items: np.ndarray, description: str) -> tuple[ItemIndex, float, float]:
    """An `ItemIndex` as `ItemIndex.build(..., index_type="factory")` makes it, with train and fill timed apart."""
    template = large.empty_factory_index(description, DIM)
    started = time.perf_counter()
    large.train_factory_index(template, items, normalize=True)
    trained = time.perf_counter()
    faiss_index = large.build_faiss_index(items, template, normalize=True)
    filled = time.perf_counter()
    return ItemIndex(faiss_index, normalize=True, index_type="factory", factory=description), trained - started, filled - trained


def sweep(index: ItemIndex, queries: np.ndarray, truth: np.ndarray, nprobes: list[int], k_factors: list[int],
          items: np.ndarray, rescore_factors: list[int]) -> list[dict]:
    """Recall@100 and one-query latency at every nprobe x k_factor, and, with `rescore_factors`, of fetching that
    many times 100 and re-scoring them exactly from the memory-mapped vectors (`rescore_exactly`)."""
    rows = []
    for nprobe in nprobes:
        for k_factor in k_factors:
            index.set_search_params(nprobe=nprobe, k_factor=k_factor)
            for rescore in [1, *rescore_factors]:
                def search(batch: np.ndarray) -> np.ndarray:
                    found = index.search(batch, TOP_K * rescore)[1] - 1  # ItemIndex numbers items from 1
                    return found if rescore == 1 else large.rescore_exactly(batch, found, items, TOP_K)[1]

                found = search(queries)
                recall = float(np.mean([len(np.intersect1d(a, b)) / TOP_K for a, b in zip(truth, found)]))
                for query in queries[:10]:
                    search(query[None])
                times = []
                for query in queries:
                    start = time.perf_counter()
                    search(query[None])
                    times.append(time.perf_counter() - start)
                rows.append({"nprobe": nprobe, "k_factor": k_factor, "rescore_factor": rescore, "recall@100": recall,
                             "p50_ms": 1000 * float(np.median(times)), "p99_ms": 1000 * float(np.percentile(times, 99))})
                logger.info("  nprobe %d k_factor %d rescore %d: recall@100 %.4f, p50 %.3f ms", nprobe, k_factor, rescore,
                            recall, rows[-1]["p50_ms"])
    return rows


def measure(size: int, factories: list[str], arguments: argparse.Namespace) -> list[dict]:
    catalogue = Catalogue(size, arguments.seed)
    started = time.perf_counter()
    items = memory_mapped_items(catalogue, size, Path(arguments.workdir), arguments.seed)
    generated = time.perf_counter()
    queries = catalogue.queries(np.random.default_rng(arguments.seed + 2), arguments.queries)
    truth = exact_top_k(items, queries)
    truth_seconds = time.perf_counter() - generated
    logger.info("%d items: generated in %.1f s, exact top %d of %d queries in %.1f s", size, generated - started, TOP_K, len(queries), truth_seconds)
    results = []
    for description in factories:
        index, train_seconds, fill_seconds = build(items, description)
        refined = isinstance(faiss.downcast_index(index.faiss_index), faiss.IndexRefine)
        logger.info("%d items %s: train %.1f s, fill %.1f s", size, description, train_seconds, fill_seconds)
        results.append({
            "items": size, "factory": description, "train_seconds": train_seconds, "fill_seconds": fill_seconds,
            "build_seconds": train_seconds + fill_seconds, "bytes_per_vector": large.bytes_per_vector(index.faiss_index),
            "flat_bytes_per_vector": 4 * DIM, "exact_top_k_seconds": truth_seconds,
            "sweep": sweep(index, queries, truth, arguments.nprobe, arguments.k_factor if refined else [1], items,
                           arguments.rescore),
        })
        del index
    return results


def best_within_target(result: dict, max_p50_ms: float = 10.0) -> dict | None:
    """The highest-recall operating point with p50 <= 10 ms (the issue's target), if any."""
    fitting = [row for row in result["sweep"] if row["p50_ms"] <= max_p50_ms]
    return max(fitting, key=lambda row: row["recall@100"]) if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--factory", nargs="+", default=list(DEFAULT_FACTORIES))
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--k-factor", type=int, nargs="+", default=[2, 4, 8], help="Refine stages only.")
    parser.add_argument("--rescore", type=int, nargs="*", default=[],
                        help="Also fetch this many times 100 and re-score them exactly from the memory-mapped vectors.")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads (build, exact search and queries).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "ivfpq"), help="Memory-mapped vectors (reused).")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ivfpq.json"))
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    faiss.omp_set_num_threads(arguments.threads)
    load_before, started = os.getloadavg(), time.perf_counter()
    results = [row for size in arguments.sizes for row in measure(size, arguments.factory, arguments)]
    report = {"command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "cpu_count": os.cpu_count(), "faiss_threads": arguments.threads, "faiss": faiss.__version__,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_seconds": time.perf_counter() - started,
              "vectors": __doc__.split("Vectors (64-d, cosine): ")[1].split("\n\n")[0].replace("\n", " "), "results": results}
    Path(arguments.out).write_text(json.dumps(report, indent=2) + "\n")
    for result in results:
        best = best_within_target(result)
        verdict = "none with p50 <= 10 ms" if best is None else (
            f"best at p50 <= 10 ms: nprobe {best['nprobe']} k_factor {best['k_factor']} rescore "
            f"{best.get('rescore_factor', 1)}, recall@100 {best['recall@100']:.3f}, "
            f"p50 {best['p50_ms']:.2f} ms")
        logger.info("%s items %s: build %.0f s, %.1f B/vector; %s", f"{result['items']:,}", result["factory"],
                    result["build_seconds"], result["bytes_per_vector"], verdict)


if __name__ == "__main__":
    main()
