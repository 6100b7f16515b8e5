"""Helpers the benchmark scripts share: where a figure was measured, and how a table is written."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages from /proc/loadavg (the machine may be shared)."""
    try:
        return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [round(value, 2) for value in os.getloadavg()]


def loadavg_text() -> str:
    """/proc/loadavg as the kernel writes it: the three load averages, running/total tasks and the last pid."""
    return Path("/proc/loadavg").read_text().strip()


def rounded_load_average() -> list[float] | None:
    """`load_average` as os.getloadavg() gives it, to two decimals (the form most results files carry); None if unknown."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def git_output(checkout: Path, *arguments: str) -> str:
    """What `git -C <checkout> <arguments>` prints, stripped; raises CalledProcessError when git fails."""
    return subprocess.run(["git", "-C", str(checkout), *arguments], capture_output=True, text=True, check=True).stdout.strip()


def commit_and_dirty(checkout: Path = ROOT) -> tuple[str | None, bool | None]:
    """The short commit a checkout is at and whether its tracked files differ from it; (None, None) without git."""
    try:
        return (git_output(checkout, "rev-parse", "--short", "HEAD"),
                bool(git_output(checkout, "status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.CalledProcessError):
        return None, None


def git_commit(checkout: Path = ROOT) -> str:
    """The commit a checkout is at, with '+changes' when its tracked files differ from it."""
    commit, dirty = commit_and_dirty(checkout)
    if commit is None:
        return "unknown"
    return f"{commit}+changes" if dirty else commit


def short_commit(checkout: Path = ROOT) -> str:
    """`git rev-parse --short HEAD` of a checkout; '' where git cannot say."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()


def files_modified(checkout: Path, *paths: str) -> bool:
    """Whether `git status` lists changes under these paths of a checkout (untracked files count)."""
    return bool(subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=checkout, capture_output=True,
                               text=True).stdout.strip())


def cpu_model() -> str | None:
    """The 'model name' line of /proc/cpuinfo; None where there is none (not Linux, or no such line)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def machine() -> dict[str, Any]:
    """CPU, core count, library versions and the load when a run started."""
    import torch
    import transformers

    return {
        "cpu": cpu_model() or platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_average_at_start": load_average(),
    }


def table_row(cells: Sequence[Any]) -> str:
    """One markdown table line, '| a | b |'."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def table_header(columns: Sequence[str], align: str = "") -> list[str]:
    """A markdown table's header and rule in the '| --- |' style; `align` has one letter per column, 'r' right-aligns."""
    return [table_row(columns), table_row("---:" if side == "r" else "---" for side in align.ljust(len(columns), "l"))]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json_and_markdown(output: Path, results: dict[str, Any], markdown: str) -> Path:
    """`output` (the results as indented JSON) and the markdown beside it with the suffix .md; returns the .md path."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    markdown_path = output.with_suffix(".md")
    markdown_path.write_text(markdown)
    return markdown_path


def write_results(name: str, results: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """bench/results/<name>.json and .md, each written whole (a temporary file renamed over the old one)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    written = []
    for path, text in ((RESULTS / f"{name}.json", json.dumps(results, indent=2) + "\n"), (RESULTS / f"{name}.md", markdown)):
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
        written.append(path)
    return written[0], written[1]
