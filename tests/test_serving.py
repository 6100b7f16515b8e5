"""Issue 18, HTTP serving: every endpoint against the Python API, every error status (401, 404, 409, 413,
422, 500, 503), auth on and off, hot reload (a broken folder keeps the old model), micro-batched answers
equal to unbatched ones, /metrics."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from llmrec import Recommender  # noqa: E402
from llmrec.cli import main  # noqa: E402
from llmrec.errors import ConfigError  # noqa: E402
from llmrec.server import ServeSettings  # noqa: E402
from llmrec.server.app import create_app  # noqa: E402
from test_serving_safety import build_recommender  # noqa: E402

HISTORY = ["i1", "i5", "i9"]


@pytest.fixture(scope="module")
def recommender(tiny_encoder_dir) -> Recommender:
    return build_recommender(tiny_encoder_dir)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_encoder_dir) -> Path:
    folder = tmp_path_factory.mktemp("served") / "model"
    build_recommender(tiny_encoder_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def client(recommender):
    with TestClient(create_app(recommender, ServeSettings(batch_wait_ms=1))) as test_client:
        yield test_client


def _pairs(items: list[dict]) -> list[tuple[str, float]]:
    return [(item["item_id"], item["score"]) for item in items]


def _assert_same_ranking(served: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [item for item, _ in served] == [item for item, _ in expected]
    np.testing.assert_allclose([s for _, s in served], [s for _, s in expected], rtol=1e-5, atol=1e-5)


class Gated:
    """A recommender whose recommend_batch waits for `release`, to hold requests in flight."""

    def __init__(self, recommender: Recommender) -> None:
        self.inner, self.entered, self.release, self.batch_sizes = recommender, threading.Event(), threading.Event(), []

    def recommend_batch(self, histories, *args, **kwargs):
        self.batch_sizes.append(len(histories))
        self.entered.set()
        assert self.release.wait(10)
        return self.inner.recommend_batch(histories, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# ----- endpoints ------------------------------------------------------------------------------------------


def test_read_endpoints_answer_as_the_python_api(client, recommender):
    response = client.post("/recommend", json={"history": HISTORY, "k": 5, "exclude": ["i2"]})
    assert response.status_code == 200
    _assert_same_ranking(_pairs(response.json()["items"]), recommender.recommend(HISTORY, 5, exclude=["i2"]))

    allowed = ["i3", "i4", "i7", "i20"]
    response = client.post("/recommend", json={"history": HISTORY, "k": 3, "filter": allowed, "exclude_history": False})
    assert {item["item_id"] for item in response.json()["items"]} <= set(allowed)
    _assert_same_ranking(_pairs(response.json()["items"]), recommender.recommend(HISTORY, 3, filter=allowed, exclude_history=False))

    histories = [HISTORY, ["i2"], []]  # [] is a cold user: most popular items
    response = client.post("/recommend/batch", json={"histories": histories, "k": 4})
    for served, expected in zip(response.json()["results"], recommender.recommend_batch(histories, 4)):
        _assert_same_ranking(_pairs(served), expected)

    response = client.post("/rerank", json={"history": HISTORY, "candidates": ["i3", 7]})  # integer ids are ids too
    assert response.status_code == 404 and "id(s): 7." in response.json()["detail"]
    response = client.post("/rerank", json={"history": HISTORY, "candidates": ["i3", "i4", "i7"]})
    _assert_same_ranking(_pairs(response.json()["items"]), recommender.rerank(HISTORY, ["i3", "i4", "i7"]))

    response = client.post("/explain", json={"history": HISTORY, "item_id": "i7"})
    weights = response.json()["weights"]
    assert [w["item_id"] for w in weights] == HISTORY
    np.testing.assert_allclose([w["weight"] for w in weights], [w for _, w in recommender.explain(HISTORY, "i7")], atol=1e-6)
    per_head = client.post("/explain", json={"history": HISTORY, "item_id": "i7", "per_head": True}).json()["weights"]
    assert all(len(w["weight"]) == 2 for w in per_head)


def test_probes_docs_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "num_items": 30}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/recommend/batch", "/rerank", "/explain", "/items", "/admin/reload", "/admin/save"} <= set(paths)
    client.post("/recommend", json={"history": HISTORY})
    client.post("/recommend", json={"history": HISTORY, "k": 0})
    text = client.get("/metrics").text
    assert 'llmrec_requests_total{endpoint="/recommend",status="200"}' in text
    assert 'llmrec_requests_total{endpoint="/recommend",status="422"}' in text
    assert 'llmrec_request_latency_seconds_bucket{endpoint="/recommend"' in text
    assert "llmrec_batch_size_count" in text
    assert "llmrec_catalogue_items 30.0" in text
    client.post("/no/such/path")
    assert 'endpoint="other"' in client.get("/metrics").text  # unknown paths share one series


def test_two_apps_keep_their_own_metrics(recommender):
    with TestClient(create_app(recommender)) as first, TestClient(create_app(recommender)) as second:
        first.post("/recommend", json={"history": HISTORY})
        assert 'endpoint="/recommend"' in first.get("/metrics").text
        assert 'endpoint="/recommend"' not in second.get("/metrics").text


def test_items_are_added_by_text_and_saved(tmp_path, tiny_encoder_dir, model_folder):
    served = tmp_path / "served"
    shutil.copytree(model_folder, served)
    with TestClient(create_app(build_recommender(tiny_encoder_dir), source=served)) as client:
        response = client.post("/items", json={"items": [{"item_id": "new1", "text": "movie number 3 genre g1"}]})
        assert response.json() == {"num_items": 31, "added": 1}
        answer = client.post("/recommend", json={"history": HISTORY, "k": 1, "filter": ["new1", "i3"], "exclude": ["i3"]})
        assert _pairs(answer.json()["items"])[0][0] == "new1"
        repeated = client.post("/items", json={"items": [{"item_id": "new1", "text": "again"}]})
        assert repeated.status_code == 422 and "already in the catalogue" in repeated.json()["detail"]
        saved = client.post("/admin/save", json={"path": str(tmp_path / "saved")})
        assert saved.json() == {"path": str(tmp_path / "saved"), "num_items": 31}
        assert client.post("/admin/save").json() == {"path": str(served), "num_items": 31}  # into the served folder
    for folder in (tmp_path / "saved", served):
        assert "new1" in Recommender.from_pretrained(folder).item_ids
    with TestClient(create_app(build_recommender(tiny_encoder_dir))) as client:  # in memory: no folder of its own
        response = client.post("/admin/save")
        assert response.status_code == 422 and '"path"' in response.json()["detail"]


# ----- bad requests: 4xx with llmrec's message, never a traceback ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ('{"history": ["i1",', 422, "JSON"),  # malformed JSON
        ('{"history": "i1"}', 422, "history"),  # a string is not a list
        ('{"history": ["i1"], "k": "10"}', 422, "k: "),
        ('{"history": ["i1"], "k": 2.5}', 422, "k: "),
        ('{"history": [1.5]}', 422, "history"),
        ('{"history": ["i1"], "kk": 3}', 422, "kk"),  # a misspelt option
        ('{"history": ["i1"], "k": 0}', 422, "k must be a positive integer"),
        ('{"history": ["i1"], "k": -3}', 422, "k must be a positive integer"),
        ('{"history": ["i1"], "k": 100000}', 422, "cap of 10000"),
        ('{"history": ["i1", "nope"]}', 404, "'nope'"),
        ('{"history": ["i1"], "exclude": ["gone"]}', 404, "'gone'"),
        ('{"history": ["i1"], "profile": "likes g1"}', 422, "no user-profile path"),
    ],
)
def test_bad_recommend_requests_get_llmrec_messages(client, body, status, message):
    response = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert "Traceback" not in response.text


def test_bad_requests_on_other_endpoints(client):
    assert client.post("/rerank", json={"history": HISTORY, "candidates": ["i3", "i3"]}).status_code == 422
    unknown = client.post("/explain", json={"history": HISTORY, "item_id": "zz"})
    assert unknown.status_code == 404 and "'zz'" in unknown.json()["detail"]
    assert client.post("/explain", json={"history": [], "item_id": "i1"}).status_code == 422
    assert client.post("/recommend/batch", json={"histories": [HISTORY, ["x9"]]}).status_code == 404
    assert client.post("/items", json={"items": [{"item_id": "n", "text": "  "}]}).status_code == 422
    assert client.post("/admin/reload", json={"path": 3}).status_code == 422


def test_limits_answer_413(recommender):
    settings = ServeSettings(max_history_items=4, max_candidates=3, max_body_bytes=600, max_item_text_chars=20,
                             max_batch_rows=2, max_id_list_items=2, max_new_items=1)
    too_large = [
        ("/recommend", {"history": ["i1"] * 5}, "max_history_items"),
        ("/recommend", {"history": ["i1"], "exclude": ["i1", "i2", "i3"]}, "max_id_list_items"),
        ("/recommend", {"history": ["i1"], "profile": "x" * 21}, "max_item_text_chars"),
        ("/recommend/batch", {"histories": [["i1"]] * 3}, "max_batch_rows"),
        ("/rerank", {"history": ["i1"], "candidates": ["i2", "i3", "i4", "i5"]}, "max_candidates"),
        ("/items", {"items": [{"item_id": "n1", "text": "y" * 21}]}, "max_item_text_chars"),
        ("/items", {"items": [{"item_id": "n1", "text": "a"}, {"item_id": "n2", "text": "b"}]}, "max_new_items"),
        ("/recommend", {"history": [], "exclude": ["i%d" % n for n in range(200)]}, "max_body_bytes"),
    ]
    with TestClient(create_app(recommender, settings)) as client:
        for path, body, setting in too_large:
            response = client.post(path, json=body)
            assert response.status_code == 413, (path, response.text)
            assert setting in response.json()["detail"]
        chunked = client.post("/recommend", content=iter([b'{"history": [' + b'"i1",' * 200, b'"i1"]}']))
        assert chunked.status_code == 413  # no Content-Length: counted as it arrives
        assert client.post("/recommend", json={"history": ["i1"] * 4}).status_code == 200


def test_unexpected_errors_are_a_generic_500(recommender):
    class Broken(Gated):
        def recommend_batch(self, *args, **kwargs):
            raise RuntimeError("secret internal detail /home/someone/model")

    with TestClient(create_app(Broken(recommender)), raise_server_exceptions=False) as client:
        response = client.post("/recommend/batch", json={"histories": [HISTORY]})
        assert response.status_code == 500
        assert response.json()["error"] == "InternalServerError"
        assert "secret" not in response.text and "Traceback" not in response.text
        batched = client.post("/recommend", json={"history": HISTORY})  # through the micro-batcher
        assert batched.status_code == 500 and "secret" not in batched.text


def test_overload_is_shed_with_503_and_retry_after(recommender):
    gated = Gated(recommender)
    with TestClient(create_app(gated, ServeSettings(max_in_flight=1, retry_after_seconds=3))) as client:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(response=client.post("/recommend", json={"history": HISTORY})))
        worker.start()
        assert gated.entered.wait(10)
        shed = client.post("/recommend", json={"history": HISTORY})
        assert client.get("/health").status_code == 200  # probes are never shed
        gated.release.set()
        worker.join(10)
    assert shed.status_code == 503 and shed.headers["retry-after"] == "3"
    assert first["response"].status_code == 200


# ----- auth --------------------------------------------------------------------------------------------------


def test_writes_need_the_token_and_reads_stay_open(recommender):
    with TestClient(create_app(recommender, ServeSettings(token="s3cret"))) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            response = client.post("/admin/reload", json={}, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert client.post("/items", json={"items": []}, headers=headers).status_code == 401
        assert client.post("/items", json={"items": []}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/recommend", json={"history": HISTORY}).status_code == 200


def test_token_for_reads_and_from_the_environment(recommender, monkeypatch):
    monkeypatch.setenv("LLMREC_SERVE_TOKEN", "from-env")
    with TestClient(create_app(recommender, ServeSettings.from_environment(token_for_reads=True))) as client:
        assert client.post("/recommend", json={"history": HISTORY}).status_code == 401
        assert client.get("/metrics").status_code == 401
        authorised = {"Authorization": "Bearer from-env"}
        assert client.post("/recommend", json={"history": HISTORY}, headers=authorised).status_code == 200
        assert client.get("/health").status_code == 200
    monkeypatch.delenv("LLMREC_SERVE_TOKEN")
    with TestClient(create_app(recommender)) as open_client:  # no token anywhere: writes are open
        assert open_client.post("/items", json={"items": []}).status_code == 200
    with pytest.raises(ConfigError, match="needs a token"):
        ServeSettings(token_for_reads=True)


def test_writes_off_for_several_workers(recommender):
    with TestClient(create_app(recommender, ServeSettings(allow_writes=False))) as client:
        response = client.post("/items", json={"items": []})
        assert response.status_code == 409 and "worker processes" in response.json()["detail"]


# ----- hot reload --------------------------------------------------------------------------------------------


def test_reload_refuses_a_broken_folder_and_keeps_serving(tmp_path, recommender, model_folder):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    app = create_app(recommender, source=model_folder)
    with TestClient(app) as client:
        before = client.post("/recommend", json={"history": HISTORY}).json()
        for path in (str(broken), str(tmp_path / "missing")):
            refused = client.post("/admin/reload", json={"path": path})
            assert refused.status_code == 409 and refused.json()["error"] == "ModelFolderError", refused.text
        assert "is missing model.safetensors" in client.post("/admin/reload", json={"path": str(broken)}).json()["detail"]
        assert app.state.llmrec.recommender is recommender
        assert client.post("/recommend", json={"history": HISTORY}).json() == before
        reloaded = client.post("/admin/reload")  # no body: the served folder again
        assert reloaded.json() == {"path": str(model_folder), "num_items": 30}
        assert app.state.llmrec.recommender is not recommender
        _assert_same_ranking(_pairs(client.post("/recommend", json={"history": HISTORY}).json()["items"]), _pairs(before["items"]))
        assert 'llmrec_reloads_total{outcome="refused"} 3.0' in client.get("/metrics").text


def test_in_flight_requests_finish_on_the_old_model(recommender, tiny_encoder_dir):
    old, new = Gated(recommender), build_recommender(tiny_encoder_dir, num_items=12)
    app = create_app(old, source="somewhere", loader=lambda path: new)
    with TestClient(app) as client:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(response=client.post("/recommend", json={"history": ["i20"]})))
        worker.start()
        assert old.entered.wait(10)
        assert client.post("/admin/reload").json() == {"path": "somewhere", "num_items": 12}
        # New requests see the new catalogue of 12 items (/rerank: the batcher is busy with the held request).
        assert client.post("/rerank", json={"history": ["i20"], "candidates": ["i1"]}).status_code == 404
        old.release.set()
        worker.join(10)
    assert first["response"].status_code == 200  # answered by the old model, which knows i20


def test_a_model_folder_loads_in_the_background(model_folder, tmp_path):
    with TestClient(create_app(str(model_folder))) as client:
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/ready").json()["num_items"] == 30
    with TestClient(create_app(str(tmp_path / "missing"))) as client:
        for _ in range(100):
            response = client.get("/ready")
            if "failed" in response.text:
                break
            threading.Event().wait(0.05)
        assert response.status_code == 503 and "does not exist" in response.json()["detail"]
        assert client.post("/recommend", json={"history": HISTORY}).status_code == 503
        assert client.get("/health").status_code == 200


# ----- micro-batching ------------------------------------------------------------------------------------------


async def _concurrent_posts(app, bodies: list[dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post("/recommend", json=body) for body in bodies))


def test_micro_batched_answers_equal_unbatched_ones(recommender):
    spy = Gated(recommender)
    spy.release.set()
    app = create_app(spy, ServeSettings(batch_wait_ms=200, max_batch_size=64))
    rng = np.random.default_rng(0)
    bodies = [{"history": [f"i{n}" for n in rng.choice(30, size=rng.integers(0, 8), replace=False)], "k": 5} for _ in range(24)]
    bodies += [{"history": HISTORY, "k": 3, "exclude": ["i2", "i4"]}, {"history": HISTORY, "k": 3, "exclude": ["i2", "i4"]},
               {"history": HISTORY, "k": 2, "filter": ["i3", "i6", "i8"]}, {"history": ["i1", "bad"], "k": 5},
               {"history": HISTORY, "k": 0}]
    responses = asyncio.run(_concurrent_posts(app, bodies))
    for body, response in zip(bodies, responses):
        if "bad" in body["history"]:
            assert response.status_code == 404 and "'bad'" in response.json()["detail"]
        elif body["k"] == 0:
            assert response.status_code == 422
        else:
            options = {name: body[name] for name in ("exclude", "filter") if name in body}
            _assert_same_ranking(_pairs(response.json()["items"]), recommender.recommend(body["history"], body["k"], **options))
    assert max(spy.batch_sizes) > 1  # requests were in fact scored together
    assert sum(size for size in spy.batch_sizes) >= len(bodies)


# ----- command line ----------------------------------------------------------------------------------------


def test_serve_command_refuses_a_missing_folder_before_listening(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--workers", "2", "--port", "1"]) == 2  # checked before forking workers
    assert "missing config.json" in capsys.readouterr().err


def test_serve_command_without_the_extra_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # as if `llmrec[serve]` were not installed
    assert main(["serve", str(tmp_path)]) == 2
    assert "pip install 'llmrec[serve]'" in capsys.readouterr().err
