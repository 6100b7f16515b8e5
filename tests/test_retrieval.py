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


def test_exclude_removes_history_and_still_returns_k_items():
    rng = np.random.default_rng(2)
    items = rng.normal(size=(30, 6)).astype(np.float32)
    queries = rng.normal(size=(3, 6)).astype(np.float32)
    index = ItemIndex.build(items, normalize=False)
    _, unfiltered = index.search(queries, k=30)
    exclude = [list(unfiltered[0, :5]), [], list(unfiltered[2, [0, 2, 4]]) + [0, 999]]
    scores, indices = index.search(queries, k=5, exclude=exclude)
    assert indices.shape == (3, 5)
    for row in range(3):
        allowed = [item for item in unfiltered[row] if item not in set(exclude[row])]
        assert indices[row].tolist() == allowed[:5]
        assert np.all(np.isfinite(scores[row]))
        assert np.all(np.diff(scores[row]) <= 0)


def test_k_larger_than_catalogue_pads_with_zero_and_minus_inf():
    items = np.eye(3, dtype=np.float32)
    index = ItemIndex.build(items)
    scores, indices = index.search(np.array([[1.0, 0.5, 0.0]], dtype=np.float32), k=5, exclude=[[2]])
    assert indices.tolist() == [[1, 3, 0, 0, 0]]
    assert np.isfinite(scores[0, :2]).all()
    assert np.all(scores[0, 2:] == -np.inf)


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
