"""Issue 18, hot reload by signal: `create_app(..., handle_sighup=True)` (what `llmrec serve` runs) reloads its
folder on SIGHUP; a broken folder is refused and the old model keeps serving.

A real SIGHUP is sent to this process, so the app's lifespan runs on the main thread's event loop (asyncio
installs signal handlers only there); the test checks the handler is installed before it signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from llmrec.server.app import create_app  # noqa: E402
from test_serving_safety import build_recommender  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is a POSIX signal")
HISTORY = ["i1", "i5", "i9"]


@pytest.fixture()
def restore_sighup():
    """Whatever happens in the test, SIGHUP gets its previous handler back (by default it ends the process)."""
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


async def _until(condition, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out waiting for the reload")


async def _serve_and_signal(app, reloads_expected: str) -> tuple[int, list[dict], object]:
    """Start the app's lifespan, answer one request, send SIGHUP, wait for the reload's outcome, answer again."""
    context = app.state.llmrec
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None), "no SIGHUP handler"
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            before = (await client.post("/recommend", json={"history": HISTORY})).json()
            served_before = context.recommender
            os.kill(os.getpid(), signal.SIGHUP)
            registry = context.metrics.registry
            await _until(lambda: (registry.get_sample_value("llmrec_reloads_total", {"outcome": reloads_expected}) or 0) >= 1)
            after = await client.post("/recommend", json={"history": HISTORY})
    return after.status_code, [before, after.json()], served_before


def test_sighup_reloads_the_served_folder(tmp_path, tiny_encoder_dir, restore_sighup):
    folder = tmp_path / "model"
    build_recommender(tiny_encoder_dir, num_items=12).save_pretrained(folder)
    in_memory = build_recommender(tiny_encoder_dir)  # 30 items: the folder's 12 tell the two apart
    app = create_app(in_memory, source=folder, handle_sighup=True)
    status, (before, after), served_before = asyncio.run(_serve_and_signal(app, "ok"))
    assert served_before is in_memory and status == 200
    reloaded = app.state.llmrec.recommender
    assert reloaded is not in_memory and reloaded.num_items == 12
    assert {item["item_id"] for item in after["items"]} <= set(reloaded.item_ids)
    assert before["items"]  # the old model answered before the signal


def test_sighup_refuses_a_broken_folder_and_keeps_serving(tmp_path, tiny_encoder_dir, restore_sighup, caplog):
    folder = tmp_path / "model"
    build_recommender(tiny_encoder_dir, num_items=12).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # e.g. a copy that was cut short
    served = build_recommender(tiny_encoder_dir)
    app = create_app(served, source=folder, handle_sighup=True)
    with caplog.at_level(logging.ERROR, logger="llmrec.server.app"):
        status, (before, after), _ = asyncio.run(_serve_and_signal(app, "refused"))
    assert app.state.llmrec.recommender is served
    assert status == 200 and after == before  # same model, same answer
    assert any("SIGHUP reload refused, still serving the previous model" in record.getMessage()
               and "model.safetensors" in record.getMessage() for record in caplog.records)


def test_sighup_handler_is_only_installed_when_asked(tmp_path, tiny_encoder_dir, restore_sighup):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = create_app(build_recommender(tiny_encoder_dir), source=tmp_path)

    async def run() -> object:
        async with app.router.lifespan_context(app):
            return signal.getsignal(signal.SIGHUP)

    assert asyncio.run(run()) is signal.SIG_IGN
