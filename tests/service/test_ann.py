"""Large galleries: the index turns approximate (fast-scan codes rescored exactly, or IVF) above the
plan's size, and per-individual top-k stays that of brute force."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from test_index import unit

from service.ml.ann import PQ_MIN_VECTORS, FastScanIndex, IndexPlan, IvfIndex, rescore
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


# Plans that look at every vector: every IVF cell scanned, or every code rescored exactly.
EVERYTHING = {
    "ivf": IndexPlan(exact_max_vectors=1000, kind="ivf", nprobe=10_000),
    "pq": IndexPlan(exact_max_vectors=1000, kind="pq", refine=10_000),
}


@pytest.mark.parametrize("kind", ["ivf", "pq"])
@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_an_index_that_looks_at_everything_gives_the_exact_per_individual_ranking(
    top_k: int, kind: str
) -> None:
    rng = np.random.default_rng(top_k)
    vectors = clustered(rng, 300, 10)
    labels = np.arange(3000) // 10
    gallery, individuals = make_gallery(vectors, labels, EVERYTHING[kind])
    assert gallery.approximate
    queries = unit(rng, 20, DIM)
    for query in queries:
        want = brute_force_individuals(vectors, labels, query, top_k)
        assert [c.individual_id for c in gallery.search_individuals(query, top_k)] == [
            individuals[i] for i in want
        ]


@pytest.mark.parametrize(
    "plan",
    [IndexPlan(exact_max_vectors=1000, kind="ivf", nprobe=4), IndexPlan(exact_max_vectors=1000, kind="pq")],
    ids=["ivf-4-cells", "pq-default"],
)
def test_an_approximate_index_finds_the_individual_of_new_photos(plan: IndexPlan) -> None:
    rng = np.random.default_rng(11)
    vectors = clustered(rng, 400, 10)
    labels = np.arange(4000) // 10
    gallery, individuals = make_gallery(vectors, labels, plan)
    # New photos: other draws around the same centres.
    queries = clustered(np.random.default_rng(11), 400, 1)[::8]
    hits = 0
    for query in queries:
        want = brute_force_individuals(vectors, labels, query, 5)
        got = [c.individual_id for c in gallery.search_individuals(query, 5)]
        hits += got[0] == individuals[want[0]]
    assert hits >= 0.98 * len(queries)


@pytest.mark.parametrize("kind", ["ivf", "pq"])
def test_the_index_is_exact_up_to_the_threshold_and_follows_adds_and_removes(kind: str) -> None:
    rng = np.random.default_rng(5)
    vectors = clustered(rng, 200, 10)
    index = VectorIndex(DIM, use_gpu=False, plan=EVERYTHING[kind])
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
    plan = IndexPlan(exact_max_vectors=500, kind="ivf", nprobe=10_000, rebuild_growth=2.0)
    index = VectorIndex(DIM, use_gpu=False, plan=plan)
    index.add(np.arange(800), vectors[:800])
    first = index._ann
    assert isinstance(first, IvfIndex) and first.built_size == 800
    index.add(np.arange(800, 1500), vectors[800:1500])
    assert index._ann is first  # grown less than twice: incremental adds
    index.add(np.arange(1500, 4000), vectors[1500:])
    rebuilt = index._ann
    assert isinstance(rebuilt, IvfIndex) and rebuilt.built_size == 4000 and rebuilt.nlist > first.nlist
    _, found = index.search(vectors[3990:], 1)
    assert found[:, 0].tolist() == list(range(3990, 4000))


@pytest.mark.parametrize("kind", ["ivf", "pq"])
def test_the_default_plans_find_the_exact_top_10_of_new_photos(kind: str) -> None:
    # The default shapes (IVF: 4 sqrt(N) cells and nprobe; PQ: 4 dimensions a code, 50 x k
    # rescored; as in docs/benchmarks.md) against brute force: nearly all of an individual's photos
    # come back, not just the best one.
    rng = np.random.default_rng(12)
    centres = unit(rng, 3000, DIM)
    vectors = photos_of(rng, centres, np.arange(30_000) // 10)
    index = VectorIndex(DIM, use_gpu=False, plan=IndexPlan(exact_max_vectors=1000, kind=kind))  # type: ignore[arg-type]
    index.add(np.arange(len(vectors)), vectors)
    if kind == "ivf":
        assert isinstance(index._ann, IvfIndex) and index._ann.nlist == int(4 * np.sqrt(len(vectors)))
    else:
        assert isinstance(index._ann, FastScanIndex) and index._ann.codes == DIM // 4
    queries = photos_of(rng, centres, rng.choice(3000, size=100, replace=False))
    _, found = index.search(queries, 10)
    want = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    recall = np.mean([len(set(f) & set(w)) / 10 for f, w in zip(found, want, strict=True)])
    assert recall >= 0.99


def test_rescoring_ranks_candidates_by_their_exact_scores_and_pads_missing_ones() -> None:
    rng = np.random.default_rng(3)
    vectors = unit(rng, 6, DIM)
    stored = {10 * i: vectors[i] for i in range(6)}
    queries = unit(rng, 2, DIM)
    candidates = np.array([[0, 10, 20, 30], [40, 50, -1, -1]], dtype=np.int64)
    scores, ids = rescore(queries, candidates, lambda keys: np.stack([stored[int(k)] for k in keys]), 3)
    first = {i: float(queries[0] @ stored[i]) for i in (0, 10, 20, 30)}
    assert ids[0].tolist() == sorted(first, key=first.__getitem__, reverse=True)[:3]
    np.testing.assert_allclose(scores[0], [first[i] for i in ids[0]], rtol=1e-5)
    second = sorted((40, 50), key=lambda i: -float(queries[1] @ stored[i]))
    assert ids[1].tolist() == [*second, -1]
    assert scores[1, 2] == -np.inf


def test_the_fast_scan_index_follows_removals() -> None:
    rng = np.random.default_rng(8)
    vectors = clustered(rng, 200, 10)
    index = VectorIndex(DIM, use_gpu=False, plan=IndexPlan(exact_max_vectors=500, kind="pq"))
    index.add(np.arange(2000), vectors)
    assert isinstance(index._ann, FastScanIndex)
    index.remove(np.arange(0, 2000, 10))  # the first photo of every individual
    scores, found = index.search(vectors[0:2000:10], 5)
    assert not np.isin(found, np.arange(0, 2000, 10)).any()
    assert (found[:, 0] // 10 == np.arange(200)).all()  # still its own individual's photos
    assert index._ann.ntotal == 1800


def test_a_pq_plan_stays_exact_below_the_size_its_codes_can_be_trained_on() -> None:
    rng = np.random.default_rng(9)
    vectors = clustered(rng, 100, 10)
    index = VectorIndex(DIM, use_gpu=False, plan=IndexPlan(exact_max_vectors=10, kind="pq"))
    index.add(np.arange(PQ_MIN_VECTORS - 1), vectors[: PQ_MIN_VECTORS - 1])
    assert not index.approximate  # above the plan's size, but too few to train 16 centroids well
    index.add(np.arange(PQ_MIN_VECTORS - 1, 1000), vectors[PQ_MIN_VECTORS - 1 :])
    assert index.approximate
