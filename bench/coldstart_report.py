"""Issue 16's comparison table: ways of lifting new items, each over several seeds of `bench/coldstart.py`.

Each `--runs LABEL=A.json,B.json,...` is one trained mechanism (one JSON per seed, written by
`bench/coldstart.py --systems hybrid ...`); the first one's `frontier` entries (a new-item score offset, slots
held with `new_items`, computed on the same trained models) become rows of their own. Writes
`bench/results/<name>.json` and `.md`, and the table between the coldstart-mechanisms markers in bench/README.md.

    python bench/coldstart_report.py --runs "hybrid (today)=s42.json,s43.json,s44.json" \
        "id_dropout 0.5=d42.json,d43.json,d44.json" --name coldstart_mechanisms_ml100k
    python bench/coldstart_report.py --extend --runs "impute_missing_ids=i42.json,i43.json,i44.json"   # rows added
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.coldstart_common import _replace_block  # noqa: E402
from bench.common import table_header, table_row, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- coldstart-mechanisms:start -->", "<!-- coldstart-mechanisms:end -->"
PARTS = ("cold", "cold_among_cold", "warm")


def collect(runs: dict[str, list[Path]], frontier: bool = True) -> dict:
    """Per row, each metric's values over the seeds (same order as the files); `frontier`: the first run's frontier rows too."""
    rows: dict[str, dict] = {}
    seeds: dict[str, list] = {}
    for position, (label, paths) in enumerate(runs.items()):
        results = [json.loads(path.read_text()) for path in paths]
        entries = [result["systems"]["hybrid"] for result in results]
        seeds[label] = [result["run"]["command"].split("--seed ")[-1].split()[0] if "--seed" in result["run"]["command"]
                        else "config" for result in results]
        for stage, suffix in (("retrieval", " retrieval"), ("rerank", " + rerank")):
            rows[label + suffix] = {part: _values(entries, lambda entry: entry[stage].get(part)) for part in PARTS}
        if position == 0 and frontier:
            for name in entries[0]["frontier"]["rows"]:
                rows[f"{label}, {name}"] = {
                    part: _values(entries, lambda entry: entry["frontier"]["rows"][name].get(part)) for part in PARTS}
            rows[label + " retrieval"]["cold_candidate_recall"] = [
                next(value for key, value in entry["frontier"].items() if key.startswith("cold_candidate_recall"))
                for entry in entries]
            rows[label + " retrieval"]["calibrated_offset"] = [entry["frontier"]["calibrated_offset"]["offset"]
                                                                for entry in entries]
    return {"rows": rows, "seeds": seeds}


def _values(entries: list[dict], pick) -> dict | None:
    metrics = [pick(entry) for entry in entries]
    if any(metric is None for metric in metrics):
        return None
    return {name: [metric[name] for metric in metrics] for name in ("ndcg@10", "hr@10")}


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def render(report: dict) -> str:
    lines = table_header(["mechanism", "cold NDCG@10", "cold HR@10", "cold among cold NDCG@10", "warm NDCG@10",
                          "warm HR@10"], "lrrrrr")
    for label, row in report["rows"].items():
        def metric(part: str, name: str) -> str:
            return _cell(row[part][name]) if row.get(part) else "–"
        lines.append(table_row([label, metric("cold", "ndcg@10"), metric("cold", "hr@10"),
                                metric("cold_among_cold", "ndcg@10"), metric("warm", "ndcg@10"), metric("warm", "hr@10")]))
    seeds = "; ".join(f"{label}: seeds {', '.join(values)}" for label, values in report["seeds"].items())
    lines += ["", f"Mean ± sample std over the seeds ({seeds}). Made by `bench/coldstart_report.py`."]
    first = next(iter(report["rows"].values()))
    if "cold_candidate_recall" in first:
        lines.append(f"Cold targets among the FAISS candidates (recall@100) of the first row: "
                     f"{_cell(first['cold_candidate_recall'])}; new-item offset fitted on warm validation users "
                     f"(random warm items scored text only): {_cell(first['calibrated_offset'])} (cosine).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="LABEL=a.json,b.json,... (one file per seed).")
    parser.add_argument("--extend", action="store_true",
                        help="Keep the rows of the existing bench/results/<name>.json and add these runs' after them, without "
                             "frontier rows (the per-seed files of earlier rows need not exist any more).")
    parser.add_argument("--name", default="coldstart_mechanisms_ml100k", help="Results file stem under bench/results/.")
    parser.add_argument("--readme", default=str(ROOT / "bench" / "README.md"))
    arguments = parser.parse_args()
    runs = {}
    for spec in arguments.runs:
        label, _, files = spec.partition("=")
        if not files:
            parser.error(f"--runs {spec!r}: expected LABEL=a.json,b.json")
        runs[label] = [Path(file) for file in files.split(",")]
    report = collect(runs, frontier=not arguments.extend)
    if arguments.extend:
        earlier = json.loads((ROOT / "bench" / "results" / f"{arguments.name}.json").read_text())
        if set(earlier["rows"]) & set(report["rows"]):
            parser.error(f"--extend: rows {sorted(set(earlier['rows']) & set(report['rows']))} are already in {arguments.name}.json.")
        report = {"rows": {**earlier["rows"], **report["rows"]}, "seeds": {**earlier["seeds"], **report["seeds"]}}
    markdown = render(report)
    write_results(arguments.name, report, f"# New items: mechanisms compared (issue 16)\n\n{markdown}")
    _replace_block(Path(arguments.readme), START, END, markdown.rstrip("\n"))
    print(markdown)


if __name__ == "__main__":
    main()
