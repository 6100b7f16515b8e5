"""Draw the benchmark charts from `bench/results/*.json` into `bench/results/plots/` (PNGs, not committed).

Each chart needs one results file and is skipped, with a log line, when that file is missing or lacks the
part the chart reads, so the script works at any stage of the benchmarks:

- scaling.json (`bench/scaling.py`): FAISS latency vs catalogue size (log x) per history length, latency vs
  history length (user tower, FAISS, rerank), recall@100 vs latency of the ANN sweep, index memory vs size;
- quality.json (`bench/quality.py`): NDCG@10 and HR@10 per system, with the spread over seeds;
- speed.json (`bench/speed.py`): p50 of every one-user timing it holds (any entry with "p50_ms").

    python bench/plot.py
    python bench/plot.py --results-dir bench/results --output-dir bench/results/plots
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INDEX_STYLES = {"flat": ("tab:blue", "o"), "hnsw": ("tab:orange", "s"), "ivf": ("tab:green", "^")}
LATENCY_TARGET_MS = 5.0
RECALL_TARGET = 0.95

logger = logging.getLogger("bench.plot")


def read_results(path: Path) -> dict | None:
    """The parsed JSON file, or None (logged) when it is missing or unreadable."""
    if not path.is_file():
        logger.info("Skipping %s: not there yet.", path.name)
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("Skipping %s: unreadable (%s).", path.name, error)
        return None


def _style(index_type: str) -> tuple[str, str]:
    return INDEX_STYLES.get(index_type, ("tab:gray", "x"))


def _short_count(value: float, _position: int = 0) -> str:
    """10000 -> 10k, 1000000 -> 1M: catalogue sizes as people say them."""
    for divisor, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= divisor:
            return f"{value / divisor:g}{suffix}"
    return f"{value:g}"


def _items_axis(axis: plt.Axes) -> None:
    axis.xaxis.set_major_formatter(FuncFormatter(_short_count))
    axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, position: _short_count(value) if _label_2_and_5(value, position) else ""))


def _label_2_and_5(value: float, _position: int) -> str:
    """Minor ticks of a log axis: label 2x and 5x a power of ten, so short axes still read."""
    leading = f"{value:.0e}"[0]
    return f"{value:g}" if leading in "25" else ""


def _plain_numbers(axis: plt.Axes) -> None:
    """Log axes labelled 0.2, 1, 10 instead of 2x10^-1: latencies are read, not exponents."""
    for scale, ticks in ((axis.get_xscale(), axis.xaxis), (axis.get_yscale(), axis.yaxis)):
        if scale == "log":
            ticks.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
            ticks.set_minor_formatter(FuncFormatter(_label_2_and_5))


def _save(figure: plt.Figure, path: Path) -> Path:
    for axis in figure.get_axes():
        _plain_numbers(axis)
        if axis.get_xlabel().startswith("catalogue size"):
            _items_axis(axis)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    logger.info("Wrote %s", path)
    return path


# ----- scaling.json ------------------------------------------------------------------------------------


def plot_latency_vs_items(scaling: dict, output_dir: Path) -> Path | None:
    """FAISS top-100 p50 per index type against catalogue size, one panel per history length."""
    entries = scaling.get("scaling") or []
    lengths = sorted({row["history_length"] for entry in entries for row in entry["retrieval"]})
    if not entries or len({entry["num_items"] for entry in entries}) < 2:
        logger.info("Skipping latency vs catalogue size: fewer than two catalogue sizes in scaling.json.")
        return None
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), sharey=True, squeeze=False)
    for axis, length in zip(axes[0], lengths):
        for index_type in dict.fromkeys(entry["index_type"] for entry in entries):
            points = sorted(
                (entry["num_items"], row["faiss"]["p50_ms"], row["faiss"]["p99_ms"])
                for entry in entries if entry["index_type"] == index_type
                for row in entry["retrieval"] if row["history_length"] == length
            )
            color, marker = _style(index_type)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=f"{index_type} p50")
            axis.plot([p[0] for p in points], [p[2] for p in points], marker=marker, color=color, linestyle=":", alpha=0.6,
                      label=f"{index_type} p99")
        rerank = sorted((row["num_items"], row["rerank"]["p50_ms"]) for row in scaling.get("rerank", []) if row["history_length"] == length)
        if rerank:
            axis.plot([p[0] for p in rerank], [p[1] for p in rerank], color="black", linestyle="--", label="rerank p50")
        axis.axhline(LATENCY_TARGET_MS, color="red", linewidth=0.8, label="5 ms target")
        axis.set(xscale="log", yscale="log", xlabel="catalogue size (items)", title=f"history {length}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per user (top-100)")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle("Retrieval latency vs catalogue size (one user per call)")
    return _save(figure, output_dir / "scaling_latency_vs_items.png")


def plot_latency_vs_history(scaling: dict, output_dir: Path) -> Path | None:
    """User tower, FAISS (per index type, largest catalogue) and rerank p50 against history length."""
    entries = scaling.get("scaling") or []
    tower = sorted((row["history_length"], row["p50_ms"]) for row in scaling.get("user_encoding", []))
    if len(tower) < 2:
        logger.info("Skipping latency vs history length: fewer than two history lengths in scaling.json.")
        return None
    largest = max(entry["num_items"] for entry in entries) if entries else None
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    axis.plot([p[0] for p in tower], [p[1] for p in tower], marker="D", color="tab:purple", label="user tower")
    for entry in entries:
        if entry["num_items"] != largest:
            continue
        points = sorted((row["history_length"], row["faiss"]["p50_ms"]) for row in entry["retrieval"])
        color, marker = _style(entry["index_type"])
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color,
                  label=f"FAISS {entry['index_type']}, {largest:,} items")
    rerank = sorted((row["history_length"], row["rerank"]["p50_ms"]) for row in scaling.get("rerank", []) if row["num_items"] == largest)
    if rerank:
        axis.plot([p[0] for p in rerank], [p[1] for p in rerank], color="black", linestyle="--", marker=".", label="rerank (100 candidates)")
    axis.set(xscale="log", yscale="log", xlabel="history length (items)", ylabel="p50 ms per user",
             title="Latency vs history length")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, output_dir / "scaling_latency_vs_history.png")


def plot_recall_vs_latency(scaling: dict, output_dir: Path) -> Path | None:
    """The ANN sweep: recall@100 against p50 latency, one curve per index type, settings annotated."""
    sweep = scaling.get("ann_sweep")
    if not sweep or not sweep.get("rows"):
        logger.info("Skipping recall vs latency: no ANN sweep in scaling.json.")
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for index_type in dict.fromkeys(row["index_type"] for row in sweep["rows"]):
        rows = sorted((row for row in sweep["rows"] if row["index_type"] == index_type), key=lambda row: row["value"] or 0)
        color, marker = _style(index_type)
        axis.plot([row["p50_ms"] for row in rows], [row["recall_at_100"] for row in rows], marker=marker, color=color, label=index_type)
        for row in rows:
            if row["value"] is not None:
                axis.annotate(str(row["value"]), (row["p50_ms"], row["recall_at_100"]), fontsize=6,
                              textcoords="offset points", xytext=(3, -8))
    axis.axhline(RECALL_TARGET, color="red", linewidth=0.8, linestyle="--", label="recall 0.95")
    axis.axvline(LATENCY_TARGET_MS, color="red", linewidth=0.8, label="5 ms")
    axis.set(xscale="log", xlabel="p50 ms per user (top-100, history excluded)", ylabel="recall@100 vs flat",
             title=f"FAISS flat / HNSW (efSearch) / IVF (nprobe), {sweep['num_items']:,} items")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, output_dir / "ann_recall_vs_latency.png")


def plot_memory_vs_items(scaling: dict, output_dir: Path) -> Path | None:
    """Index size per type against catalogue size, with the pipeline's per-item caches for comparison."""
    entries = scaling.get("scaling") or []
    if len({entry["num_items"] for entry in entries}) < 2:
        logger.info("Skipping memory vs catalogue size: fewer than two catalogue sizes in scaling.json.")
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for index_type in dict.fromkeys(entry["index_type"] for entry in entries):
        points = sorted((entry["num_items"], entry["memory"]["index_bytes"] / 2**20) for entry in entries if entry["index_type"] == index_type)
        color, marker = _style(index_type)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=f"{index_type} index")
    caches = sorted({(entry["num_items"], entry["memory"]["pipeline_item_cache_bytes"] / 2**20) for entry in entries})
    axis.plot([p[0] for p in caches], [p[1] for p in caches], color="black", linestyle="--", label="pipeline item caches")
    tables = sorted({(entry["num_items"], entry["memory"]["model_item_tables_bytes"] / 2**20) for entry in entries})
    axis.plot([p[0] for p in tables], [p[1] for p in tables], color="gray", linestyle=":", label="model item tables")
    axis.set(xscale="log", yscale="log", xlabel="catalogue size (items)", ylabel="MiB", title="Memory vs catalogue size")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, output_dir / "memory_vs_items.png")


# ----- quality.json ------------------------------------------------------------------------------------


def quality_rows(quality: dict) -> list[tuple[str, dict[str, tuple[float, float]]]]:
    """(system label, {metric: (mean, std)}) from bench/quality.py's "rows", or from a plain {"systems": {name: {"test": {...}}}}."""
    rows = []
    for row in quality.get("rows") or []:
        summary = row.get("summary", {})
        metrics = {}
        for metric in ("ndcg@10", "hr@10"):
            value = summary.get(f"test {metric}")
            if isinstance(value, dict) and value.get("mean") is not None:
                metrics[metric] = (value["mean"], value.get("std") or 0.0)
        if metrics:
            rows.append((row.get("label") or row.get("system", "?"), metrics))
    if rows:
        return rows
    for name, system in (quality.get("systems") or {}).items():
        test = system.get("test") if isinstance(system, dict) else None
        if isinstance(test, dict):
            metrics = {metric: (test[metric], 0.0) for metric in ("ndcg@10", "hr@10") if isinstance(test.get(metric), (int, float))}
            if metrics:
                rows.append((name, metrics))
    return rows


def plot_quality(quality: dict, output_dir: Path) -> Path | None:
    """Grouped bars of test NDCG@10 and HR@10 per system, error bars = std over seeds."""
    rows = quality_rows(quality)
    if not rows:
        logger.info("Skipping quality per system: no test NDCG@10 / HR@10 found in quality.json.")
        return None
    figure, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.5))
    width = 0.38
    for offset, (metric, color) in enumerate((("ndcg@10", "tab:blue"), ("hr@10", "tab:orange"))):
        positions = [position + (offset - 0.5) * width for position in range(len(rows))]
        means = [metrics.get(metric, (0.0, 0.0))[0] for _, metrics in rows]
        errors = [metrics.get(metric, (0.0, 0.0))[1] for _, metrics in rows]
        axis.bar(positions, means, width, yerr=errors, capsize=3, color=color, label=metric.upper().replace("@", "@"))
    axis.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=25, ha="right", fontsize=8)
    axis.set(ylabel="test metric", title="Quality per system (MovieLens-100k, full ranking)")
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, output_dir / "quality_per_system.png")


# ----- speed.json --------------------------------------------------------------------------------------


def speed_rows(speed: dict) -> list[tuple[str, float]]:
    """(label, p50 ms) of every one-user timing (a dict with "p50_ms") anywhere in speed.json, labelled by its path."""
    found = []

    def visit(node: Any, trail: list[str]) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("p50_ms"), (int, float)):
                label = node.get("label") or node.get("name") or " / ".join(part for part in trail if part not in ("sections", "details"))
                found.append((str(label), float(node["p50_ms"])))
                return
            for key, value in node.items():
                visit(value, [*trail, str(key)])
        elif isinstance(node, list):
            for position, value in enumerate(node):
                visit(value, [*trail, str(position)])

    visit({key: value for key, value in speed.items() if key not in ("machine", "run")}, [])
    return found


def plot_speed(speed: dict, output_dir: Path) -> Path | None:
    """Horizontal bars of p50 latency per configuration found in speed.json."""
    rows = speed_rows(speed)
    if not rows:
        logger.info("Skipping speed: no entries with p50_ms found in speed.json.")
        return None
    figure, axis = plt.subplots(figsize=(9.0, 0.35 * len(rows) + 1.5))
    axis.barh(range(len(rows)), [value for _, value in rows], color="tab:blue")
    axis.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    axis.invert_yaxis()
    axis.set(xscale="log", xlabel="p50 ms, one user per call", title="Speed benchmark (speed.json)")
    axis.grid(True, axis="x", which="both", alpha=0.3)
    return _save(figure, output_dir / "speed_p50.png")


# ----- main --------------------------------------------------------------------------------------------

CHARTS: dict[str, list[Callable[[dict, Path], Path | None]]] = {
    "scaling.json": [plot_latency_vs_items, plot_latency_vs_history, plot_recall_vs_latency, plot_memory_vs_items],
    "quality.json": [plot_quality],
    "speed.json": [plot_speed],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "bench" / "results" / "plots")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, charts in CHARTS.items():
        results = read_results(args.results_dir / file_name)
        if results is None:
            continue
        for chart in charts:
            try:
                path = chart(results, args.output_dir)
            except (KeyError, TypeError, ValueError) as error:  # a results file of another shape: skip, never crash
                logger.warning("Skipping %s from %s: unexpected structure (%r).", chart.__name__, file_name, error)
                continue
            if path is not None:
                written.append(path)
    logger.info("%d chart(s) in %s", len(written), args.output_dir)


if __name__ == "__main__":
    main()
