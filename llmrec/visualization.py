"""Attention heatmaps: which history items the reranking head looked at for each recommended item.

matplotlib is an optional dependency (`pip install llmrec[plot]`), imported only when a plot is drawn,
and always through the Agg canvas so plotting works on headless servers and never touches pyplot state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from .utils.io import atomic_write

if TYPE_CHECKING:
    from .recommender import Recommender

LABEL_WIDTH = 32  # characters of item text shown next to an id
ANNOTATE_MAX_CELLS = 150  # write the weight into each cell only while that stays legible


def _require_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("Attention heatmaps need matplotlib: pip install 'llmrec[plot]'") from None
    return Figure, FigureCanvasAgg


def _label(item_id: str, text: str, width: int = LABEL_WIDTH) -> str:
    text = " ".join(str(text).split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    return f"{item_id}: {text}" if text else str(item_id)


def attention_matrix(
    recommender: "Recommender", history: Sequence[str], item_ids: Sequence[str], per_head: bool = False
) -> tuple[list[str], np.ndarray]:
    """History items the model read and their `explain` weights for each item.

    Returns (history_item_ids, weights) with weights shaped (history, items), or (heads, history, items)
    with `per_head`. Only the most recent `max_history_length` history items are read, so they are the rows.
    """
    if not item_ids:
        raise ValueError("Pass at least one item id to explain.")
    columns = []
    history_item_ids: list[str] = []
    for item_id in item_ids:
        explained = recommender.explain(list(history), item_id, per_head=per_head)
        history_item_ids = [history_item_id for history_item_id, _ in explained]
        columns.append(np.asarray([weight for _, weight in explained], dtype=np.float64))
    weights = np.stack(columns, axis=-1)  # (history, items) or (history, heads, items)
    return history_item_ids, (weights.transpose(1, 0, 2) if per_head else weights)


def plot_attention_heatmap(
    recommender: "Recommender",
    history: Sequence[str],
    item_ids: Sequence[str],
    path: Union[str, Path],
    per_head: bool = False,
) -> Path:
    """Draw history items (rows) x `item_ids` (columns), coloured by `Recommender.explain` weight, to `path`.

    With `per_head` there is one panel per attention head. The image format follows the file extension
    (png, svg, pdf, ...); the file is written to a temporary sibling and renamed, so it is never half-written.
    """
    Figure, FigureCanvasAgg = _require_matplotlib()
    path = Path(path)
    file_format = path.suffix.lstrip(".").lower() or "png"
    figure = Figure()
    canvas = FigureCanvasAgg(figure)
    supported = canvas.get_supported_filetypes()
    if file_format not in supported:
        raise ValueError(f"Cannot write a .{file_format} image; use one of {', '.join('.' + name for name in sorted(supported))}.")

    history_item_ids, weights = attention_matrix(recommender, history, item_ids, per_head)
    panels = weights if per_head else weights[np.newaxis]
    texts = dict(zip(recommender.item_ids, recommender.item_texts))
    row_labels = [_label(item_id, texts.get(item_id, "")) for item_id in history_item_ids]
    column_labels = [_label(item_id, texts.get(item_id, ""), width=24) for item_id in item_ids]

    num_rows, num_columns = panels.shape[1:]
    panel_width = max(2.5, 0.45 * num_columns + 1.0)
    figure.set_size_inches(2.8 + panel_width * len(panels) + 1.0, max(2.5, 0.32 * num_rows + 2.2))
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    colour_max = float(panels.max()) if panels.size and panels.max() > 0 else 1.0
    for head, (ax, panel) in enumerate(zip(axes, panels)):
        image = ax.imshow(panel, aspect="auto", cmap="viridis", vmin=0.0, vmax=colour_max, interpolation="nearest")
        ax.set_xticks(range(num_columns), column_labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(num_rows), row_labels, fontsize=8)
        ax.set_xlabel("scored item")
        if per_head:
            ax.set_title(f"head {head + 1}", fontsize=9)
        if num_rows * num_columns <= ANNOTATE_MAX_CELLS:
            for row in range(num_rows):
                for column in range(num_columns):
                    value = panel[row, column]
                    ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if value > 0.6 * colour_max else "white")
    axes[0].set_ylabel("history item (oldest at top)")
    figure.colorbar(image, ax=list(axes), label="attention weight")
    figure.suptitle("What the reranker attended to", fontsize=10)

    with atomic_write(path) as temporary:
        figure.savefig(temporary, format=file_format, dpi=120, bbox_inches="tight")
    return path
