"""bench/results/attention.md from the results dict bench/attention.py saves: one table per section that ran."""

from __future__ import annotations

from typing import Any

from common import table_header


def run_line(section: dict[str, Any]) -> list[str]:
    run = section.get("run")
    if run is None:
        return []
    start, end = run["load_average_1min"]
    return [f"Ran {run['date']}, {run['torch_threads']} torch thread(s), load average {start:.1f} → {end:.1f}.", ""]


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# Attention optimisations (bench/attention.py)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, bf16 instructions: {'yes' if machine['cpu_bf16'] else 'no'}; "
        f"torch {machine['torch']}; latest run {machine['date']}. Other jobs may share the cores (see each section's load "
        "average); ratios are of interleaved runs.",
        "",
        "Sections can come from different runs (`--sections`); each says when it ran, with how many threads and "
        "under what 1-minute load average (start → end).",
        "",
    ]
    for key, section_lines in (("cache", _cache_lines), ("kernels", _kernel_lines), ("history", _history_lines),
                               ("precision", _precision_lines), ("int8_serving", _int8_serving_lines)):
        if key in results:
            lines += section_lines(results[key])
    return "\n".join(lines)


def _cache_lines(cache: dict[str, Any]) -> list[str]:
    return [
        f"## Serving cache: rerank {cache['num_candidates']} candidates, one user ({cache['history_length']} history items)",
        "",
        *run_line(cache),
        *table_header(["path", "p50 ms", "p99 ms"]),
        *[f"| {name} | {value['p50_ms']:.2f} | {value['p99_ms']:.2f} |" for name, value in cache["timings"].items()],
        "",
        f"Full cache vs no cache: **{cache['speedup_vs_no_cache']:.1f}×** (target ≥ 3×: "
        f"{'met' if cache['speedup_vs_no_cache'] >= 3 else 'missed'}); vs item cache alone: "
        f"{cache['speedup_vs_item_cache']:.2f}×. Scores: max |Δ| {cache['max_score_difference_cached_vs_projected']:.1e} "
        f"(cached vs projected per request), {cache['max_score_difference_cached_vs_reencoded']:.1e} (vs re-encoded), "
        "so NDCG@10 is unchanged.",
        "",
    ]


def _kernel_lines(kernels: dict[str, Any]) -> list[str]:
    lines = [
        "## Kernels: SDPA vs plain softmax(QKᵀ)V (user encoder + reranker)",
        "",
        *run_line(kernels),
        *table_header(["scope", "SDPA p50 ms", "plain p50 ms", "speed-up"]),
    ]
    for scope, label in (("all_users", f"all {kernels['num_users']} users, batches of 256"), ("one_user", "one user")):
        row = kernels[scope]
        lines.append(f"| {label} | {row['sdpa']['p50_ms']:.2f} | {row['plain softmax(QK^T)V']['p50_ms']:.2f} | {row['speedup']:.2f}× |")
    return lines + ["", f"Max score difference {kernels['max_score_difference']:.1e}: NDCG@10 unchanged.", ""]


def _history_lines(history: dict[str, Any]) -> list[str]:
    ratio = history["cost_ratio_1000_vs_100"]
    return [
        f"## Long histories: encode one user + rerank 100 candidates (window {history['window']})",
        "",
        *run_line(history),
        *table_header(["history length", "window + summary p50 ms", "full attention p50 ms"]),
        *[f"| {row['history_length']} | {row['window + summary']:.2f} | {row['full attention']:.2f} |" for row in history["rows"]],
        "",
        f"Cost at 1,000 items / cost at 100: window + summary **{ratio['window + summary']:.2f}×** (target ≤ 3×: "
        f"{'met' if ratio['window + summary'] <= 3 else 'missed'}); full attention {ratio['full attention']:.2f}×.",
        "",
    ]


def _precision_lines(precision: dict[str, Any]) -> list[str]:
    lines = [
        f"## Precision: catalogue encoding ({precision['num_texts']} texts, batch {precision['batch_size']})",
        "",
        *run_line(precision),
        *table_header(["variant", "texts/s", "speed-up", "cosine to fp32 (mean / min)", "test NDCG@10 retrieval", "rerank",
                       "Δ rerank"]),
    ]
    for name, value in precision["catalogue_encoding"].items():
        lines.append(
            f"| {name} | {value['texts_per_second']:.0f} | {value['speedup']:.2f}× | {value['cosine_to_fp32_mean']:.5f} / "
            f"{value['cosine_to_fp32_min']:.5f} | {value['test_ndcg@10']['retrieval']:.4f} | "
            f"{value['test_ndcg@10']['rerank']:.4f} | {100 * value['ndcg_relative_change']['rerank']:+.1f} % |"
        )
    variants = {name: value for name, value in precision["catalogue_encoding"].items() if name != "fp32"}
    passing = [name for name, value in variants.items()
               if value["speedup"] >= 1.8 and min(value["ndcg_relative_change"].values()) >= -0.01]
    best = max(variants, key=lambda name: variants[name]["speedup"])
    return lines + [
        "",
        "Target ≥ 1.8 × fp32 with NDCG@10 (retrieval and rerank) at most 1 % lower: "
        + (f"**met** by {', '.join(passing)}." if passing
           else f"**missed** (fastest: {best}, {variants[best]['speedup']:.2f}×)."),
        "",
    ]


def _int8_serving_lines(serving: dict[str, Any]) -> list[str]:
    timing, ndcg = serving["recommend_one_user"], serving["test_ndcg@10"]
    return [
        "## int8 serving: `Recommender.from_pretrained(..., quantize=\"int8\")`, `recommend(k=10)` for one user",
        "",
        *run_line(serving),
        *table_header(["model", "p50 ms", "p99 ms", "test NDCG@10 rerank"]),
        *[f"| {name} | {timing[name]['p50_ms']:.2f} | {timing[name]['p99_ms']:.2f} | {ndcg[name]['rerank']:.4f} |" for name in ("fp32", "int8")],
        "",
    ]
