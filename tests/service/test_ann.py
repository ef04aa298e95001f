"""Large galleries: the index turns to IVF above the plan's size, and per-individual top-k stays
that of brute force."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from test_index import unit

from service.ml.ann import IndexPlan
from service.ml.gallery import Gallery, GalleryEntry
from service.ml.index import VectorIndex

DIM = 64


def clustered(rng: np.random.Generator, individuals: int, per: int, spread: float = 0.35) -> np.ndarray:
    """Photos of individuals: unit vectors scattered around one centre per individual, as embeddings
    of a trained model are. Row i belongs to individual i // per."""
    return photos_of(rng, unit(rng, individuals, DIM), np.arange(individuals * per) // per, spread)


def photos_of(
    rng: np.random.Generator, centres: np.ndarray, owners: np.ndarray, spread: float = 0.35
) -> np.ndarray:
    """New draws around ``centres[owners]``: one photo per entry of ``owners``."""
    noisy = centres[owners] + spread * rng.normal(size=(len(owners), DIM)) / np.sqrt(DIM)
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def brute_force_individuals(
    vectors: np.ndarray, labels: np.ndarray, query: np.ndarray, top_k: int
) -> list[int]:
    best: dict[int, None] = {}
    for i in np.argsort(-(vectors @ query), kind="stable"):
        best.setdefault(int(labels[i]), None)
        if len(best) == top_k:
            break
    return list(best)


def make_gallery(vectors: np.ndarray, labels: np.ndarray, plan: IndexPlan) -> tuple[Gallery, list[uuid.UUID]]:
    individuals = [uuid.UUID(int=i + 1) for i in range(int(labels.max()) + 1)]
    gallery = Gallery(DIM, use_gpu=False)
    gallery.add(
        range(len(vectors)),
        vectors,
        [GalleryEntry(image_id=uuid.uuid4(), individual_id=individuals[int(lab)]) for lab in labels],
    )
    gallery.set_plan(plan)
    return gallery, individuals


@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_ivf_scanning_every_cell_gives_the_exact_per_individual_ranking(top_k: int) -> None:
    rng = np.random.default_rng(top_k)
    vectors = clustered(rng, 300, 10)
    labels = np.arange(3000) // 10
    plan = IndexPlan(exact_max_vectors=1000, nprobe=10_000)  # nprobe beyond nlist: every cell
    gallery, individuals = make_gallery(vectors, labels, plan)
    assert gallery.approximate
    queries = unit(rng, 20, DIM)
    for query in queries:
        want = brute_force_individuals(vectors, labels, query, top_k)
        assert [c.individual_id for c in gallery.search_individuals(query, top_k)] == [
            individuals[i] for i in want
        ]


def test_ivf_with_few_cells_scanned_still_finds_the_individual_of_new_photos() -> None:
    rng = np.random.default_rng(11)
    vectors = clustered(rng, 400, 10)
    labels = np.arange(4000) // 10
    gallery, individuals = make_gallery(vectors, labels, IndexPlan(exact_max_vectors=1000, nprobe=4))
    # New photos: other draws around the same centres.
    queries = clustered(np.random.default_rng(11), 400, 1)[::8]
    hits = 0
    for query in queries:
        want = brute_force_individuals(vectors, labels, query, 5)
        got = [c.individual_id for c in gallery.search_individuals(query, 5)]
        hits += got[0] == individuals[want[0]]
    assert hits >= 0.98 * len(queries)


def test_the_index_is_exact_up_to_the_threshold_and_follows_adds_and_removes() -> None:
    rng = np.random.default_rng(5)
    vectors = clustered(rng, 200, 10)
    index = VectorIndex(DIM, use_gpu=False, plan=IndexPlan(exact_max_vectors=1000, nprobe=10_000))
    index.add(np.arange(1000), vectors[:1000])
    assert not index.approximate  # at the threshold: exact
    index.add(np.arange(1000, 2000), vectors[1000:])
    assert index.approximate
    removed = np.arange(0, 2000, 3)
    index.remove(removed)
    kept = np.setdiff1d(np.arange(2000), removed)
    _, found = index.search(vectors[:50], 10)
    assert not np.isin(found, removed).any()
    exact = vectors[kept] @ vectors[:50].T
    want = kept[np.argsort(-exact, axis=0, kind="stable")[:10].T]
    np.testing.assert_array_equal(found, want)
    index.remove(np.arange(2000))
    assert not index.approximate and index.ntotal == 0


def test_the_ivf_is_rebuilt_when_the_gallery_has_grown() -> None:
    rng = np.random.default_rng(6)
    vectors = clustered(rng, 400, 10)
    plan = IndexPlan(exact_max_vectors=500, nprobe=10_000, rebuild_growth=2.0)
    index = VectorIndex(DIM, use_gpu=False, plan=plan)
    index.add(np.arange(800), vectors[:800])
    first = index._ivf
    assert first is not None and first.built_size == 800
    index.add(np.arange(800, 1500), vectors[800:1500])
    assert index._ivf is first  # grown less than twice: incremental adds
    index.add(np.arange(1500, 4000), vectors[1500:])
    assert index._ivf is not None and index._ivf.built_size == 4000 and index._ivf.nlist > first.nlist
    _, found = index.search(vectors[3990:], 1)
    assert found[:, 0].tolist() == list(range(3990, 4000))


def test_the_default_plan_finds_the_exact_top_10_of_new_photos() -> None:
    # The default IVF shape (4 sqrt(N) cells, nprobe as in docs/benchmarks.md) against brute force:
    # nearly all of an individual's photos come back, not just the best one.
    rng = np.random.default_rng(12)
    centres = unit(rng, 3000, DIM)
    vectors = photos_of(rng, centres, np.arange(30_000) // 10)
    index = VectorIndex(DIM, use_gpu=False, plan=IndexPlan(exact_max_vectors=1000))
    index.add(np.arange(len(vectors)), vectors)
    assert index._ivf is not None and index._ivf.nlist == int(4 * np.sqrt(len(vectors)))
    queries = photos_of(rng, centres, rng.choice(3000, size=100, replace=False))
    _, found = index.search(queries, 10)
    want = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    recall = np.mean([len(set(f) & set(w)) / 10 for f, w in zip(found, want, strict=True)])
    assert recall >= 0.99
