"""The FAISS wrapper and the per-individual gallery search against brute-force numpy oracles."""

from __future__ import annotations

import uuid

import faiss
import numpy as np
import pytest

from service.ml.gallery import Gallery, GalleryEntry
from service.ml.index import VectorIndex, as_unit_vectors, gpu_count


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def oracle(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, in float64, best first."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


@pytest.mark.parametrize("nq", [1, 7])  # one query: FAISS's SIMD loop; a batch: one BLAS product
@pytest.mark.parametrize("n,dim,k", [(1, 8, 1), (50, 16, 5), (1000, 64, 10), (300, 512, 300), (20, 8, 50)])
def test_search_matches_brute_force(n: int, dim: int, k: int, nq: int) -> None:
    rng = np.random.default_rng(n + dim)
    vectors = unit(rng, n, dim)
    ids = rng.choice(10**12, size=n, replace=False).astype(np.int64)
    queries = unit(rng, nq, dim)
    index = VectorIndex(dim, use_gpu=False)
    index.add(ids, vectors)

    scores, found = index.search(queries, k)
    want_scores, want_ids = oracle(vectors, ids, queries, k)
    assert found.shape == (nq, min(k, n))  # never padded with -1 beyond the gallery
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(found, want_ids)


def test_ids_are_the_given_database_ids_and_vectors_are_normalised() -> None:
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(5, 8)).astype(np.float32) * 7.0  # not unit length
    index = VectorIndex(8, use_gpu=False)
    index.add(np.array([101, 7, 55, 3, 99]), raw)
    assert index.ids().tolist() == [101, 7, 55, 3, 99]
    np.testing.assert_allclose(np.linalg.norm(index.vectors(), axis=1), 1.0, atol=1e-6)
    scores, found = index.search(raw[2], 1)
    assert found[0, 0] == 55
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(index.reconstruct(np.array([3])), as_unit_vectors(raw[3], 8))


def test_remove_then_search_matches_brute_force_on_what_is_left() -> None:
    rng = np.random.default_rng(2)
    vectors, ids = unit(rng, 200, 32), np.arange(1000, 1200, dtype=np.int64)
    index = VectorIndex(32, use_gpu=False)
    index.add(ids, vectors)
    drop = ids[::3]
    assert index.remove(np.concatenate([drop, [5, 6]])) == len(drop)  # unknown ids are ignored
    keep = ~np.isin(ids, drop)
    queries = unit(rng, 5, 32)
    _, found = index.search(queries, 10)
    np.testing.assert_array_equal(found, oracle(vectors[keep], ids[keep], queries, 10)[1])
    assert len(index) == int(keep.sum())
    assert int(drop[0]) not in index


def test_adding_an_existing_id_or_a_bad_vector_is_refused() -> None:
    index = VectorIndex(4, use_gpu=False)
    index.add(np.array([1, 2]), np.eye(4, dtype=np.float32)[:2])
    with pytest.raises(ValueError, match="already"):
        index.add(np.array([2]), np.eye(4, dtype=np.float32)[2:3])
    with pytest.raises(ValueError, match="duplicate"):
        index.add(np.array([3, 3]), np.eye(4, dtype=np.float32)[2:4])
    with pytest.raises(ValueError, match="zero"):
        index.add(np.array([4]), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="finite"):
        index.add(np.array([4]), np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="shape"):
        index.add(np.array([4]), np.ones((1, 5), np.float32))
    assert index.ids().tolist() == [1, 2]


def test_an_add_the_gpu_mirror_refuses_leaves_the_index_unchanged() -> None:
    rng = np.random.default_rng(6)
    vectors = unit(rng, 5, 8)
    index = VectorIndex(8, use_gpu=False)
    index.add(np.array([1, 2]), vectors[:2])
    index._gpu = faiss.IndexFlatIP(9)  # a mirror that refuses every add, as a GPU out of memory would
    with pytest.raises(AssertionError):
        index.add(np.array([3, 4, 5]), vectors[2:])
    assert index.ids().tolist() == [1, 2] and len(index) == 2 and 3 not in index
    index._gpu = None
    index.add(np.array([3, 4, 5]), vectors[2:])  # the retry is not refused as "already in the index"
    _, found = index.search(vectors, 1)
    assert found[:, 0].tolist() == [1, 2, 3, 4, 5]


def test_empty_index_returns_no_neighbours() -> None:
    index = VectorIndex(16, use_gpu=False)
    scores, found = index.search(np.ones(16, np.float32), 5)
    assert scores.shape == (1, 0) and found.shape == (1, 0)


def entries_for(labels: np.ndarray) -> tuple[list[GalleryEntry], list[uuid.UUID]]:
    individuals = [uuid.UUID(int=int(i) + 1) for i in range(int(labels.max()) + 1)]
    return [
        GalleryEntry(image_id=uuid.uuid4(), individual_id=individuals[int(lab)]) for lab in labels
    ], individuals


@pytest.mark.parametrize("top_k", [1, 3, 10, 40])
def test_gallery_returns_each_individual_once_with_its_best_image(top_k: int) -> None:
    rng = np.random.default_rng(top_k)
    n, dim = 600, 32
    labels = rng.integers(0, 30, size=n)  # 30 individuals, about 20 images each
    vectors = unit(rng, n, dim)
    entries, individuals = entries_for(labels)
    gallery = Gallery(dim, use_gpu=False)
    gallery.add(range(1, n + 1), vectors, entries)

    query = unit(rng, 1, dim)[0]
    found = gallery.search_individuals(query, top_k)

    scores = vectors @ query
    best_per = {}
    for i in np.argsort(-scores, kind="stable"):
        best_per.setdefault(int(labels[i]), int(i))
    want = list(best_per.items())[:top_k]
    assert len({c.individual_id for c in found}) == len(found)  # never the same individual twice
    assert [c.individual_id for c in found] == [individuals[lab] for lab, _ in want]
    assert [c.image_id for c in found] == [entries[i].image_id for _, i in want]
    np.testing.assert_allclose([c.similarity for c in found], [scores[i] for _, i in want], atol=1e-5)
    assert [c.similarity for c in found] == sorted((c.similarity for c in found), reverse=True)


def test_gallery_with_fewer_individuals_than_top_k_returns_them_all() -> None:
    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 0, 1, 1, 2])
    entries, individuals = entries_for(labels)
    gallery = Gallery(8, use_gpu=False)
    gallery.add(range(6), unit(rng, 6, 8), entries)
    found = gallery.search_individuals(unit(rng, 1, 8)[0], 10)
    assert sorted(c.individual_id for c in found) == sorted(individuals)
    assert Gallery(8, use_gpu=False).search_individuals(unit(rng, 1, 8)[0], 3) == []


def test_gallery_reassign_and_remove_follow_merges_and_deletes() -> None:
    rng = np.random.default_rng(4)
    vectors = unit(rng, 4, 8)
    a, b = uuid.uuid4(), uuid.uuid4()
    images = [uuid.uuid4() for _ in range(4)]
    gallery = Gallery(8, use_gpu=False)
    gallery.add([10, 11, 12, 13], vectors, [GalleryEntry(images[i], a if i < 2 else b) for i in range(4)])
    gallery.reassign([12, 13], a)
    assert {c.individual_id for c in gallery.search_individuals(vectors[3], 5)} == {a}
    assert gallery.remove([10, 11]) == 2
    ids, _ = gallery.snapshot()
    assert ids.tolist() == [12, 13]
    assert gallery.search_individuals(vectors[0], 1)[0].image_id in (images[2], images[3])


def test_gallery_counts_images_per_individual_through_enrolls_merges_and_deletes() -> None:
    rng = np.random.default_rng(6)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    owners = [a, a, a, b, b, c]
    gallery = Gallery(8, use_gpu=False)
    assert gallery.image_counts() == {}
    gallery.add(range(6), unit(rng, 6, 8), [GalleryEntry(uuid.uuid4(), o) for o in owners])
    assert gallery.image_counts() == {3: 1, 2: 1, 1: 1}
    gallery.reassign([5], b)  # c merged into b
    assert gallery.image_counts() == {3: 2}
    with pytest.raises(ValueError):
        gallery.add([0], unit(rng, 1, 8), [GalleryEntry(uuid.uuid4(), c)])  # an id already stored
    assert gallery.image_counts() == {3: 2}
    gallery.remove([0, 1, 99])
    assert gallery.image_counts() == {1: 1, 3: 1}
    gallery.remove([2])
    assert gallery.image_counts() == {3: 1}


@pytest.mark.cuda
@pytest.mark.skipif(gpu_count() == 0, reason="FAISS sees no GPU")
def test_gpu_index_matches_the_cpu_master() -> None:
    rng = np.random.default_rng(5)
    vectors, ids = unit(rng, 5000, 512), np.arange(5000, dtype=np.int64) * 3
    queries = unit(rng, 32, 512)
    gpu, cpu = VectorIndex(512, use_gpu=True), VectorIndex(512, use_gpu=False)
    for index in (gpu, cpu):
        index.add(ids, vectors)
        index.remove(ids[:100])
    assert gpu.on_gpu and not cpu.on_gpu
    g_scores, g_ids = gpu.search(queries, 10)
    c_scores, c_ids = cpu.search(queries, 10)
    np.testing.assert_array_equal(g_ids, c_ids)
    np.testing.assert_allclose(g_scores, c_scores, atol=1e-4)


def test_requesting_a_gpu_index_without_a_gpu_fails_clearly() -> None:
    if faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no GPU"):
        VectorIndex(8, use_gpu=True)
