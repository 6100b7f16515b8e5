"""Every system the benchmarks train is a valid configuration of every shipped config.

The shipped configs switch on head features (e.g. `model.rerank_text_similarity`) that some systems cannot
have (ID-only has no item text); a system's overrides must switch those off, or its benchmark run stops
at the config check after the others have trained.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmrec.config import load_config
from llmrec.config.loading import parse_overrides

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from coldstart_common import SYSTEMS  # noqa: E402
from quality_systems import LEARNED_SYSTEMS  # noqa: E402

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
@pytest.mark.parametrize("system", sorted(LEARNED_SYSTEMS))
def test_quality_systems_are_valid_configs(config, system):
    settings = load_config(config, parse_overrides(LEARNED_SYSTEMS[system]))
    assert settings.model.use_text_embeddings or settings.model.use_id_embeddings


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_coldstart_systems_are_valid_configs(config, system):
    settings = load_config(config, {"model": SYSTEMS[system]})
    assert all(getattr(settings.model, name) == value for name, value in SYSTEMS[system].items())
