"""bench/results/scaling.md from the results dict bench/scaling.py saves, and the verdict on the 1M-item target."""

from __future__ import annotations

from common import table_header


def target_verdict(results: dict) -> dict:
    """The issue's target: 1M items, top-100 for one user in <= 5 ms p50 at recall@100 >= 0.95."""
    sweep = results.get("ann_sweep")
    if not sweep:
        return {"evaluated": False, "reason": "no ANN sweep in this run"}
    met = [(index_type, best) for index_type, best in sweep["best"].items() if best and best["meets_target"]]
    return {
        "evaluated": True,
        "num_items": sweep["num_items"],
        "at_1m_items": sweep["num_items"] >= 1_000_000,
        "met": bool(met) and sweep["num_items"] >= 1_000_000,
        "fastest": min((best for best in sweep["best"].values() if best), key=lambda best: best["p50_ms"], default=None),
    }


def _setting(row: dict) -> str:
    return "exact" if row["value"] is None else f"{row['param']}={row['value']}"


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f}"


def _vectors_paragraph(vectors: dict) -> str:
    """How the synthetic catalogue was made, with its calibration and local dimension."""
    if vectors.get("noise") == "isotropic":
        noise = (f"isotropic Gaussian noise of expected norm {vectors['noise_scale']} x the parent's nearest-neighbour "
                 "distance")
    else:
        noise = (f"Gaussian noise shaped like the parent's real neighbourhood (a random combination of the offsets to its "
                 f"{vectors['noise_neighbours']} nearest real neighbours; expected norm {vectors['noise_scale']} x their RMS distance)")
    text = (f"**Vectors.** The {vectors['real_items']:,} real item vectors of `{vectors['model']}` ({vectors['dim']}-d) "
            f"plus children clustered around them: a uniformly drawn real parent, moved with probability "
            f"{vectors['mix_probability']} towards one of its {vectors['mix_neighbours']} nearest real neighbours by "
            f"U(0, {vectors['max_mix_fraction']}), plus {noise}.")
    if "real_nn_cosine_percentiles_5_50_95" in vectors:
        text += (f" The noise scale is calibrated so that a real-sized synthetic sample is as spread out as the real items "
                 f"(nearest-neighbour cosine percentiles 5/50/95: {vectors['synthetic_sample_nn_cosine_percentiles_5_50_95']} "
                 f"against {vectors['real_nn_cosine_percentiles_5_50_95']}).")
    if "real_local_dimension" in vectors:
        sizes = ", ".join(f"{int(size):,} items {value}" for size, value in vectors.get("local_dimension_by_size", {}).items())
        text += (f" Local dimension (participation ratio of the offsets to the 20 nearest neighbours, median): real items "
                 f"{vectors['real_local_dimension']}; synthetic {sizes}.")
    return text + (" Queries: the model's user tower on real MovieLens-100k histories. Latencies: p50 / p99 of one user "
                   "per call after warm-up; QPS: users per second in batches.")


def render_markdown(results: dict) -> str:
    lines = _header_lines(results)
    lines += _retrieval_lines(results)
    lines += _tower_and_rerank_lines(results)
    lines += _memory_lines(results)
    sweep = results.get("ann_sweep")
    if sweep:
        lines += _sweep_lines(sweep)
    lines += _target_lines(results["target"])
    return "\n".join(lines) + "\n"


def _header_lines(results: dict) -> list[str]:
    """Command, machine and how the vectors were made."""
    machine, vectors = results["machine"], results["vectors"]
    return [
        "# Scaling benchmark",
        "",
        f"`{results['run']['command']}` — wall time {results['run']['wall_seconds'] / 60:.1f} min, {machine['date']}.",
        f"{machine['cpu']}, {machine['logical_cores']} logical cores (torch {machine['torch_threads']} threads, FAISS "
        f"{machine['faiss_threads']}); torch {machine['torch']}, faiss {machine['faiss']}, Python {machine['python']}; "
        f"code {machine['git_commit']}{' + uncommitted changes' if machine['git_dirty'] else ''}"
        + (f"; load average {machine['load_average_at_start'][0]} at start, {machine['load_average_at_end'][0]} at end."
           if machine.get("load_average_at_start") and machine.get("load_average_at_end") else "."),
        "",
        _vectors_paragraph(vectors),
    ]


def _retrieval_lines(results: dict) -> list[str]:
    lines = ["", "## Retrieval: top-100, history excluded", ""]
    lines += table_header(["items", "index", "history", "FAISS p50 ms", "FAISS p99 ms", "FAISS batch QPS",
                           "tower + FAISS p50 ms", "tower + FAISS p99 ms"], "rlrrrrrr")
    for entry in results["scaling"]:
        for row in entry["retrieval"]:
            lines.append(
                f"| {entry['num_items']:,} | {entry['index_type']} | {row['history_length']} | {row['faiss']['p50_ms']:.3f} | "
                f"{row['faiss']['p99_ms']:.3f} | {row['faiss_batch_qps']:,.0f} | {row['tower_and_faiss']['p50_ms']:.3f} | "
                f"{row['tower_and_faiss']['p99_ms']:.3f} |"
            )
    return lines + ["", "FAISS: `ItemIndex.search` alone, in a tight loop, which keeps an index that fits the CPU cache there "
                    "between calls. Tower + FAISS: `CandidatePipeline.retrieve` (user tower, then the search), the served path; "
                    "the tower's work between searches evicts the index from cache, so at sizes where FAISS alone is "
                    "cache-resident it costs more than the sum of the two. Batched: history exclusion over-fetches k + the "
                    "longest history in the batch for every user in it."]


def _tower_and_rerank_lines(results: dict) -> list[str]:
    lines = ["", "## User tower and rerank (100 candidates)", ""]
    lines += table_header(["items", "history", "user tower p50 ms", "p99 ms", "rerank p50 ms", "rerank p99 ms",
                           "rerank batch QPS"], "rrrrrrr")
    tower = {row["history_length"]: row for row in results["user_encoding"]}
    for row in results["rerank"]:
        encoding = tower.get(row["history_length"], {})
        lines.append(
            f"| {row['num_items']:,} | {row['history_length']} | {encoding.get('p50_ms', float('nan')):.3f} | "
            f"{encoding.get('p99_ms', float('nan')):.3f} | {row['rerank']['p50_ms']:.3f} | {row['rerank']['p99_ms']:.3f} | "
            f"{row['rerank_batch_qps']:,.0f} |"
        )
    model = results.get("model", {})
    return lines + ["", f"User tower: the real model (hidden {model.get('hidden_size')}) on one history; it reads at most the "
                    f"{model.get('max_history_length')} most recent items. Rerank: `CandidatePipeline.rerank` on the user's 100 "
                    "retrieved candidates with the user embedding given (as `retrieve_and_rerank` calls it)."]


def _memory_lines(results: dict) -> list[str]:
    lines = ["", "## Memory", ""]
    lines += table_header(["items", "index", "params", "build s", "index MiB", "pipeline item caches MiB",
                           "full model item tables MiB", "process RSS MiB"], "rllrrrrr")
    for entry in results["scaling"]:
        memory = entry["memory"]
        params = ", ".join(f"{name}={value}" for name, value in entry["params"].items()) or "–"
        lines.append(
            f"| {entry['num_items']:,} | {entry['index_type']} | {params} | {entry['build_seconds']:.1f} | {_mb(memory['index_bytes'])} | "
            f"{_mb(memory['pipeline_item_cache_bytes'])} | {_mb(memory['model_item_tables_bytes'])} | {_mb(memory.get('rss_bytes'))} |"
        )
    return lines + ["", "Build s: single build, on the threads of this run (an index loaded from the cache reports its original "
                    "build). Pipeline item caches: what `CandidatePipeline` holds per item (item representations and any head "
                    "projections). Full model item tables: the model's BERT text-embedding buffer and ID embeddings at that size "
                    "(computed, not built: the synthetic catalogue bypasses them). RSS is cumulative over the run."]


def _sweep_lines(sweep: dict) -> list[str]:
    """Flat against HNSW and IVF at the largest size, and each index's fastest setting that reaches the recall target."""
    lines = ["", f"## Flat vs HNSW vs IVF at {sweep['num_items']:,} items", "",
             f"{sweep['queries']} real users, each with its full history excluded (median {sweep['history_lengths_p50']} "
             "items); recall@100 against the flat index's top 100; latency one user per call.", ""]
    lines += table_header(["index", "setting", "recall@100", "p50 ms", "p99 ms", "batch QPS"], "llrrrr")
    for row in sweep["rows"]:
        lines.append(f"| {row['index_type']} | {_setting(row)} | {row['recall_at_100']:.4f} | {row['p50_ms']:.3f} | "
                     f"{row['p99_ms']:.3f} | {row['batch_qps']:,.0f} |")
    lines += ["", "Fastest setting with recall@100 >= 0.95:", ""]
    for index_type, best in sweep["best"].items():
        if best is None:
            lines.append(f"- {index_type}: none reaches recall@100 0.95")
        else:
            lines.append(f"- {index_type}: {_setting(best)}, recall@100 {best['recall_at_100']:.4f}, p50 {best['p50_ms']:.3f} ms, "
                         f"p99 {best['p99_ms']:.3f} ms")
    return lines


def _target_lines(target: dict) -> list[str]:
    lines = ["", "## Target", ""]
    if not target["evaluated"]:
        lines.append(f"Not evaluated: {target['reason']}.")
    elif not target["at_1m_items"]:
        lines.append(f"Not evaluated at 1M items (largest catalogue in this run: {target['num_items']:,}).")
    else:
        fastest = target["fastest"]
        verdict = "**met**" if target["met"] else "**missed**"
        detail = "no index reached recall@100 0.95" if fastest is None else (
            f"fastest: {fastest['index_type']} {_setting(fastest)}, "
            f"p50 {fastest['p50_ms']:.3f} ms at recall@100 {fastest['recall_at_100']:.4f}")
        lines.append(f"1M items, top-100 for one user in <= 5 ms p50 at recall@100 >= 0.95 (FAISS search, history excluded): "
                     f"{verdict} — {detail}.")
    return lines
