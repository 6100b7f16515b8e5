"""ItemIndex search order, exclusion, padding and persistence, plus the atomic-write helper it relies on."""

import json

import numpy as np
import pytest

from llmrec.errors import ModelFolderError
from llmrec.retrieval import ItemIndex
from llmrec.utils import atomic_write, write_json_atomic


def _brute_force_top_k(queries, items, k):
    scores = queries @ items.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order + 1


def test_known_vectors_exact_inner_product_order():
    items = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]], dtype=np.float32)
    index = ItemIndex.build(items, normalize=False)
    assert (index.num_items, index.dim) == (4, 2)
    scores, indices = index.search(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32), k=3)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    assert indices.tolist() == [[3, 1, 2], [3, 2, 1]]
    np.testing.assert_array_equal(scores, np.array([[3.0, 1.0, 0.0], [3.0, 2.0, 0.0]], dtype=np.float32))


def test_matches_numpy_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(200, 16)).astype(np.float32)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    scores, indices = ItemIndex.build(items, normalize=False).search(queries, k=10)
    expected_scores, expected_indices = _brute_force_top_k(queries, items, 10)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_normalize_gives_cosine_ranking_without_touching_the_input():
    rng = np.random.default_rng(1)
    items = rng.normal(size=(50, 8)) * rng.uniform(0.1, 10.0, size=(50, 1))  # float64, varied norms
    queries = rng.normal(size=(4, 8)) * 5.0
    items_before, queries_before = items.copy(), queries.copy()
    scores, indices = ItemIndex.build(items, normalize=True).search(queries, k=5)
    unit_items = items / np.linalg.norm(items, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected_scores, expected_indices = _brute_force_top_k(unit_queries, unit_items, 5)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert np.all(scores <= 1.0 + 1e-5)
    np.testing.assert_array_equal(items, items_before)
    np.testing.assert_array_equal(queries, queries_before)


@pytest.mark.parametrize("exclusion_path", ["dense table", "per-query isin"])
def test_exclude_removes_history_and_still_returns_k_items(exclusion_path, monkeypatch):
    if exclusion_path == "per-query isin":  # what batches too big for the dense table of seen flags take
        monkeypatch.setattr("llmrec.retrieval.index.DENSE_EXCLUSION_MAX_CELLS", 0)
    rng = np.random.default_rng(2)
    items = rng.normal(size=(30, 6)).astype(np.float32)
    queries = rng.normal(size=(3, 6)).astype(np.float32)
    index = ItemIndex.build(items, normalize=False)
    _, unfiltered = index.search(queries, k=30)
    exclude = [list(unfiltered[0, :5]), [], list(unfiltered[2, [0, 2, 4]]) + [0, 999, -3]]
    scores, indices = index.search(queries, k=5, exclude=exclude)
    assert indices.shape == (3, 5)
    for row in range(3):
        allowed = [item for item in unfiltered[row] if item not in set(exclude[row])]
        assert indices[row].tolist() == allowed[:5]
        assert np.all(np.isfinite(scores[row]))
        assert np.all(np.diff(scores[row]) <= 0)
        one_scores, one_indices = index.search(queries[row : row + 1], k=5, exclude=[exclude[row]])  # one-query path
        assert one_indices[0].tolist() == indices[row].tolist()
        np.testing.assert_allclose(one_scores[0], scores[row], rtol=1e-6)


def test_k_larger_than_catalogue_is_capped_and_excluded_slots_pad_with_zero_and_minus_inf():
    items = np.eye(3, dtype=np.float32)
    index = ItemIndex.build(items)
    scores, indices = index.search(np.array([[1.0, 0.5, 0.0]], dtype=np.float32), k=5, exclude=[[2]])
    assert indices.tolist() == [[1, 3, 0]]  # never wider than the catalogue
    assert np.isfinite(scores[0, :2]).all()
    assert np.all(scores[0, 2:] == -np.inf)
    # A k far beyond the catalogue allocates nothing of its size (it used to allocate batch x k arrays).
    scores, indices = index.search(np.ones((2, 3), dtype=np.float32), k=10**12)
    assert indices.shape == scores.shape == (2, 3)


def test_add_continues_item_indices():
    index = ItemIndex.build(np.array([[1.0, 0.0]], dtype=np.float32), normalize=False)
    index.add(np.array([[0.0, 1.0], [5.0, 0.0]], dtype=np.float32))
    assert index.num_items == 3
    _, indices = index.search(np.array([[1.0, 0.0]], dtype=np.float32), k=3)
    assert indices.tolist() == [[3, 1, 2]]
    np.testing.assert_array_equal(index.reconstruct_all(), np.array([[1, 0], [0, 1], [5, 0]], dtype=np.float32))


def test_bad_k_and_dimension_are_clear_errors():
    index = ItemIndex.build(np.eye(4, dtype=np.float32))
    for bad_k in (0, -3):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(np.ones((1, 4), dtype=np.float32), k=bad_k)
    with pytest.raises(ValueError, match="dimension 3 but the index stores dimension 4"):
        index.search(np.ones((1, 3), dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="exclude has 2 entries"):
        index.search(np.ones((1, 4), dtype=np.float32), k=1, exclude=[[], []])


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    items = rng.normal(size=(40, 5)).astype(np.float32)
    queries = rng.normal(size=(6, 5)).astype(np.float32)
    exclude = [[1, 2], [], [3], [], [40], [5, 6, 7]]
    index = ItemIndex.build(items, normalize=True)
    path = tmp_path / "model" / "items.faiss"
    index.save(path)
    loaded = ItemIndex.load(path)
    assert loaded.normalize is True and loaded.num_items == 40 and loaded.dim == 5
    for original, restored in zip(index.search(queries, 8, exclude), loaded.search(queries, 8, exclude)):
        np.testing.assert_array_equal(original, restored)
    np.testing.assert_array_equal(loaded.reconstruct_all(), index.reconstruct_all())
    meta = json.loads((tmp_path / "model" / "items.faiss.json").read_text())
    assert meta == {"format_version": 1, "normalize": True, "dim": 5, "num_items": 40}
    assert sorted(p.name for p in path.parent.iterdir()) == ["items.faiss", "items.faiss.json"]


def test_load_missing_truncated_or_garbage_file_raises_model_folder_error(tmp_path):
    path = tmp_path / "items.faiss"
    with pytest.raises(ModelFolderError, match="items.faiss"):
        ItemIndex.load(path)

    ItemIndex.build(np.eye(8, dtype=np.float32)).save(path)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ModelFolderError, match="items.faiss"):
        ItemIndex.load(path)

    path.write_bytes(b"this is not a faiss index at all" * 4)
    with pytest.raises(ModelFolderError, match="items.faiss"):
        ItemIndex.load(path)


def test_atomic_write_exception_keeps_old_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomic(path, {"version": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as temporary:
            temporary.write_text('{"version": 2, "half": ')
            raise RuntimeError("boom")
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_atomic_write_replaces_folders_whole(tmp_path):
    folder = tmp_path / "model"
    with atomic_write(folder) as temporary:
        temporary.mkdir()
        (temporary / "weights.bin").write_bytes(b"old")
        (temporary / "stale.txt").write_text("only in the old folder")
    with pytest.raises(ValueError):
        with atomic_write(folder) as temporary:
            temporary.mkdir()
            (temporary / "weights.bin").write_bytes(b"half")
            raise ValueError("interrupted")
    assert (folder / "weights.bin").read_bytes() == b"old"
    with atomic_write(folder) as temporary:
        temporary.mkdir()
        (temporary / "weights.bin").write_bytes(b"new")
    assert sorted(p.name for p in folder.iterdir()) == ["weights.bin"]
    assert (folder / "weights.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ----- approximate index types (HNSW, IVF) -------------------------------------------------------------

ANN_TYPES = ["hnsw", "ivf"]
ALL_TYPES = ["flat", *ANN_TYPES]


def _clustered(num_items: int, dim: int, num_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items scattered around cluster centres (as real item embeddings are), and queries near random items."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim))
    items = centres[rng.integers(0, num_clusters, num_items)] + 0.35 * rng.normal(size=(num_items, dim))
    queries = items[rng.integers(0, num_items, 40)] + 0.35 * rng.normal(size=(40, dim))
    return items.astype(np.float32), queries.astype(np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a[a > 0], b[b > 0])) / max(1, (b > 0).sum()) for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def clustered():
    return _clustered(3000, 16, 40, seed=5)


@pytest.mark.parametrize("index_type", ALL_TYPES)
def test_save_load_round_trip_keeps_type_and_search_params(tmp_path, clustered, index_type):
    items, queries = clustered
    params = {"flat": {}, "hnsw": {"M": 12, "efConstruction": 60, "efSearch": 40}, "ivf": {"nlist": 20, "nprobe": 3}}[index_type]
    index = ItemIndex.build(items, index_type=index_type, **params)
    path = tmp_path / "items.faiss"
    index.save(path)
    loaded = ItemIndex.load(path)
    assert loaded.index_type == index_type and loaded.params == index.params
    for name, value in params.items():
        assert loaded.params[name] == value
    exclude = [list(range(1, 1 + row)) for row in range(len(queries))]
    for original, restored in zip(index.search(queries, 10, exclude), loaded.search(queries, 10, exclude)):
        np.testing.assert_array_equal(original, restored)
    meta = json.loads(sidecar_text(path))
    if index_type == "flat":  # unchanged version-1 sidecar, readable by older llmrec
        assert meta == {"format_version": 1, "normalize": True, "dim": 16, "num_items": 3000}
    else:
        assert meta["format_version"] == 2 and meta["index_type"] == index_type and meta["params"] == loaded.params


def sidecar_text(path) -> str:
    return path.with_name(path.name + ".json").read_text()


def test_search_params_change_without_rebuild_and_survive_save(tmp_path, clustered):
    items, _ = clustered
    index = ItemIndex.build(items, index_type="hnsw", efSearch=20)
    index.set_search_params(efSearch=300)
    assert index.faiss_index.hnsw.efSearch == 300
    index.save(tmp_path / "items.faiss")
    assert ItemIndex.load(tmp_path / "items.faiss").params["efSearch"] == 300
    with pytest.raises(ValueError, match="cannot be set on a hnsw index at search time"):
        index.set_search_params(M=8)
    with pytest.raises(ValueError, match="cannot be set on a flat index"):
        ItemIndex.build(items).set_search_params(nprobe=4)


def test_sidecar_that_contradicts_the_file_or_has_a_newer_version_is_refused(tmp_path, clustered):
    items, _ = clustered
    path = tmp_path / "items.faiss"
    ItemIndex.build(items, index_type="hnsw").save(path)
    meta_path = path.with_name(path.name + ".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "index_type": "ivf"}))
    with pytest.raises(ModelFolderError, match="holds a hnsw index but the metadata says ivf"):
        ItemIndex.load(path)
    meta_path.write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(ModelFolderError, match="format version 3"):
        ItemIndex.load(path)
    meta_path.write_text(json.dumps({**meta, "params": {"efSearch": 0}}))
    with pytest.raises(ModelFolderError, match="efSearch must be a positive integer"):
        ItemIndex.load(path)


@pytest.mark.parametrize("index_type", ALL_TYPES)
def test_exclusion_and_allowed_filters_hold_for_every_type(clustered, index_type, monkeypatch):
    monkeypatch.setattr("llmrec.retrieval.index.EXACT_FILTER_MAX_ITEMS", 100)  # so this small catalogue has both paths
    items, queries = clustered
    index = ItemIndex.build(items, index_type=index_type)
    exact = ItemIndex.build(items)
    _, unfiltered = exact.search(queries, 20)
    exclude = [list(row[:10]) for row in unfiltered]  # the nearest items, as a user's history would be
    narrow = np.arange(1, 3001, 37)  # 82 items (<= 100): scored exactly by the approximate types
    wide = np.arange(1, 3001, 2)  # 1,500 items: passed to FAISS as an ID selector
    for allowed in (None, narrow, wide):
        scores, indices = index.search(queries, 15, exclude=exclude, allowed=allowed)
        assert indices.shape == (len(queries), 15) and (indices > 0).all() and np.isfinite(scores).all()
        assert np.all(np.diff(scores, axis=1) <= 1e-6)
        for row, excluded in zip(indices, exclude):
            assert not set(row) & set(excluded)
            if allowed is not None:
                assert set(row) <= set(allowed.tolist())
        _, expected = exact.search(queries, 15, exclude=exclude, allowed=allowed)
        if allowed is narrow or index_type == "flat":
            np.testing.assert_array_equal(indices, expected)
        else:
            assert _recall(indices, expected) >= 0.9


@pytest.mark.parametrize("index_type", ANN_TYPES)
def test_approximate_recall_against_flat_on_clustered_items(index_type):
    items, queries = _clustered(8000, 32, 60, seed=6)
    _, truth = ItemIndex.build(items).search(queries, 100)
    _, found = ItemIndex.build(items, index_type=index_type).search(queries, 100)
    assert _recall(found, truth) >= 0.95
    if index_type == "hnsw":
        # The beam is widened to k: efSearch 8 alone would find far fewer than 100 good items.
        _, narrow_beam = ItemIndex.build(items, index_type="hnsw", efSearch=8).search(queries, 100)
        assert _recall(narrow_beam, truth) >= 0.9


@pytest.mark.parametrize("index_type", ALL_TYPES)
def test_add_and_extended_keep_type_params_and_find_new_items(clustered, index_type):
    items, _ = clustered
    index = ItemIndex.build(items[:2500], index_type=index_type)
    grown = index.extended(items[2500:])
    assert index.num_items == 2500 and grown.num_items == 3000
    assert grown.index_type == index_type and grown.params == index.params
    _, indices = grown.search(items[2500:2520], 1)
    assert indices[:, 0].tolist() == list(range(2501, 2521))
    index.add(items[2500:])
    np.testing.assert_allclose(index.reconstruct_all(), grown.reconstruct_all(), rtol=1e-6)


def test_ivf_on_tiny_catalogues_and_short_results(clustered):
    tiny = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)
    index = ItemIndex.build(tiny, index_type="ivf")
    assert index.params["nlist"] == 1  # one list: an exact search
    _, indices = index.search(tiny, 5)
    assert sorted(indices[0].tolist()) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="nlist=8 needs at least that many items"):
        ItemIndex.build(tiny, index_type="ivf", nlist=8)
    with pytest.raises(ValueError, match="cannot be built from zero items"):
        ItemIndex.build(np.empty((0, 4), dtype=np.float32), index_type="ivf")
    # One probed list holds ~75 items; asking for 400 must still return 400 (the search is widened).
    items, queries = clustered
    scores, indices = ItemIndex.build(items, index_type="ivf", nlist=40, nprobe=1).search(queries, 400)
    assert (indices > 0).all() and np.isfinite(scores).all()
    assert all(len(set(row)) == 400 for row in indices.tolist())


def test_bad_index_types_and_params_are_clear_errors(clustered):
    items, _ = clustered
    with pytest.raises(ValueError, match="Unknown index_type 'annoy'; choose one of flat, hnsw, ivf"):
        ItemIndex.build(items, index_type="annoy")
    with pytest.raises(ValueError, match="Unknown parameter 'nprobe' for index_type 'hnsw'; valid parameters: M, efConstruction, efSearch"):
        ItemIndex.build(items, index_type="hnsw", nprobe=4)
    with pytest.raises(ValueError, match="valid parameters: none"):
        ItemIndex.build(items, M=16)
    for bad in (0, -2, 2.5, True, "16"):
        with pytest.raises(ValueError, match="M must be a positive integer"):
            ItemIndex.build(items, index_type="hnsw", M=bad)
    # None leaves a parameter at its default, so configs need not repeat the library's defaults.
    assert ItemIndex.build(items[:500], index_type="hnsw", M=None, efSearch=None).params == ItemIndex.build(
        items[:500], index_type="hnsw"
    ).params
