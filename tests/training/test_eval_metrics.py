"""training.metrics against small hand-worked examples (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from training.metrics import (
    auc,
    best_accuracy_threshold,
    best_match,
    cmc_curve,
    decision_prf,
    eer,
    identification_ranks,
    individual_scores,
    mean_average_precision,
    open_set_auroc,
    pair_scores,
    per_individual_top1,
    roc,
    similarity,
    tar_at_far,
    threshold_at_far,
    topk_accuracy,
    verification_accuracy,
)

# Gallery: two images of A, one of B, one of C. Queries of A, B, C and D (D is not enrolled).
GALLERY = np.array(["A", "A", "B", "C"])
QUERIES = np.array(["A", "B", "C"])
SIM = np.array(
    [
        [0.2, 0.9, 0.5, 0.1],  # A: A = max(.2, .9) = .9, B = .5, C = .1 -> A is 1st
        [0.8, 0.1, 0.6, 0.7],  # B: A = .8, C = .7, B = .6 -> B is 3rd
        [0.3, 0.4, 0.4, 0.4],  # C: A = B = C = .4, a three-way tie -> counted against: 3rd
    ]
)


def test_similarity_is_cosine_of_rows():
    a = np.array([[3.0, 4.0], [1.0, 0.0]])  # unit rows: (.6, .8), (1, 0)
    b = np.array([[0.0, 2.0], [1.0, 1.0]])  # unit rows: (0, 1), (1/sqrt2, 1/sqrt2)
    s = 1 / math.sqrt(2)
    expected = [[0.8, (0.6 + 0.8) * s], [0.0, s]]  # dot products of the unit rows
    np.testing.assert_allclose(similarity(a, b), expected, atol=1e-12)
    assert similarity(a.astype(np.float32), b.astype(np.float32)).dtype == np.float32


def test_individual_scores_take_the_best_image():
    individuals, scores = individual_scores(SIM, GALLERY)
    assert individuals.tolist() == ["A", "B", "C"]
    # A's column is the max of gallery columns 0 and 1.
    np.testing.assert_allclose(scores, [[0.9, 0.5, 0.1], [0.8, 0.6, 0.7], [0.4, 0.4, 0.4]])


def test_identification_ranks_topk_and_cmc():
    ranks = identification_ranks(SIM, QUERIES, GALLERY)
    assert ranks.tolist() == [1, 3, 3]
    assert topk_accuracy(ranks, 1) == pytest.approx(1 / 3)  # only A's query is first
    assert topk_accuracy(ranks, 2) == pytest.approx(1 / 3)
    assert topk_accuracy(ranks, 3) == 1.0
    np.testing.assert_allclose(cmc_curve(ranks, 4), [1 / 3, 1 / 3, 1.0, 1.0])


def test_identification_of_unenrolled_individual_is_refused():
    with pytest.raises(ValueError, match="closed set"):
        identification_ranks(SIM[:1], np.array(["D"]), GALLERY)


def test_collapsed_embeddings_score_chance_not_perfect():
    # Every similarity equal: each true individual ties with all 3 -> rank 3 for everyone.
    ranks = identification_ranks(np.ones((3, 4)), QUERIES, GALLERY)
    assert ranks.tolist() == [3, 3, 3]
    assert topk_accuracy(ranks, 1) == 0.0


def test_best_match():
    labels, scores = best_match(SIM, GALLERY)
    assert labels[:2].tolist() == ["A", "A"]  # B's query is closest to A (.8)
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.4])


def test_per_individual_top1_hand_worked():
    # A: 3 queries, one wrong (answered B); B: 2 queries, both wrong (C, then C); C: 1 right.
    labels = np.array(["A", "A", "A", "B", "B", "C"])
    ranks = np.array([1, 2, 1, 3, 2, 1])
    predicted = np.array(["A", "B", "A", "C", "C", "C"])
    rows = per_individual_top1(labels, ranks, predicted)
    assert rows == [
        {"individual": "B", "queries": 2, "top1": 0.0, "confused_with": "C", "confused_count": 2},
        {"individual": "A", "queries": 3, "top1": 2 / 3, "confused_with": "B", "confused_count": 1},
        {"individual": "C", "queries": 1, "top1": 1.0, "confused_with": None, "confused_count": 0},
    ]


def test_mean_average_precision_hand_worked():
    queries = np.array(["A", "B", "C", "D"])
    sim = np.vstack([SIM, [0.5, 0.5, 0.5, 0.5]])
    # A: order g1(.9, A) g2(.5) g0(.2, A) g3 -> hits at 1 and 3: AP = (1/1 + 2/3) / 2 = 5/6
    # B: order g0(.8) g3(.7) g2(.6, B) g1 -> hit at 3: AP = 1/3
    # C: g1, g2, g3 tie at .4; irrelevant first -> C's image at 3: AP = 1/3
    # D: no relevant image -> left out. mAP = (5/6 + 1/3 + 1/3) / 3 = 1/2
    assert mean_average_precision(sim, queries, GALLERY) == pytest.approx(0.5)
    assert mean_average_precision(sim, queries, GALLERY, chunk=1) == pytest.approx(0.5)
    assert math.isnan(mean_average_precision(sim[3:], queries[3:], GALLERY))


def test_mean_average_precision_matches_sklearn_without_ties():
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(30, 40))
    queries, gallery = rng.integers(0, 6, size=30), rng.integers(0, 6, size=40)
    expected = np.mean(
        [
            average_precision_score(gallery == q, row)
            for q, row in zip(queries, sim, strict=True)
            if (gallery == q).any()
        ]
    )
    assert mean_average_precision(sim, queries, gallery, chunk=7) == pytest.approx(expected)


def test_pair_scores_hand_worked():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    labels = np.array(["a", "a", "b", "b"])
    # pairs in order (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): cosines 0, 1, -1, 0, 0, -1
    scores, is_same = pair_scores(emb, labels)
    np.testing.assert_allclose(scores, [0, 1, -1, 0, 0, -1])
    assert is_same.tolist() == [True, False, False, False, False, True]
    # Images 0 and 1 are one clip: their pair is left out.
    scores, is_same = pair_scores(emb, labels, groups=np.array(["g0", "g0", "g1", "g2"]), block=1)
    np.testing.assert_allclose(scores, [1, -1, 0, 0, -1])
    assert is_same.tolist() == [False, False, False, False, True]


def test_pair_scores_blocks_match_brute_force():
    rng = np.random.default_rng(2)
    emb, labels = rng.normal(size=(23, 5)), rng.integers(0, 4, size=23)
    i, j = np.triu_indices(23, k=1)
    scores, is_same = pair_scores(emb, labels, block=4)
    np.testing.assert_allclose(scores, similarity(emb, emb)[i, j], atol=1e-12)
    np.testing.assert_array_equal(is_same, labels[i] == labels[j])


# Verification example: genuine .9 .8 .4, impostor .7 .3 .2.
V_SCORES = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2])
V_SAME = np.array([True, True, True, False, False, False])


def test_roc_points_are_far_and_tar_of_their_thresholds():
    far, tar, thresholds = roc(V_SCORES, V_SAME)
    genuine, impostor = V_SCORES[V_SAME], V_SCORES[~V_SAME]
    for f, t, th in zip(far, tar, thresholds, strict=True):
        assert f == pytest.approx(np.mean(impostor >= th)) and t == pytest.approx(np.mean(genuine >= th))
    # Corners by hand, threshold by threshold: +inf (0, 0); .9 (0, 1/3); .8 (0, 2/3); just above .4,
    # impostor .7 in: (1/3, 2/3); .4 (1/3, 1); the lowest score .2 accepts all: (1, 1).
    np.testing.assert_allclose(far, [0, 0, 0, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(tar, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert thresholds[0] == np.inf and thresholds[-1] == 0.2


def test_roc_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(3)
    same = rng.random(400) < 0.3
    scores = np.round(rng.normal(size=400) + same, 1).astype(np.float32)  # many ties across classes
    assert auc(scores, same) == pytest.approx(roc_auc_score(same, scores), abs=1e-12)
    ref_far, ref_tar, _ = roc_curve(same, scores, drop_intermediate=False)
    for target in (0.0, 0.01, 0.05, 0.1, 0.3, 0.5):
        assert tar_at_far(scores, same, target) == ref_tar[ref_far <= target].max()
    # EER oracle: scikit-learn's full curve, interpolated where FAR - FRR changes sign.
    gap = ref_far - (1 - ref_tar)
    i = int(np.argmax(gap >= 0))
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    assert eer(scores, same) == pytest.approx(ref_far[i - 1] + t * (ref_far[i] - ref_far[i - 1]))


def test_auc_and_eer_hand_worked():
    # Genuine-over-impostor wins: .9 and .8 beat all 3, .4 beats .3 and .2 -> 8 of 9 pairs.
    assert auc(V_SCORES, V_SAME) == pytest.approx(8 / 9)
    # At threshold .7: FAR = 1/3 (.7 accepted), FRR = 1/3 (.4 rejected) -> EER = 1/3 exactly.
    assert eer(V_SCORES, V_SAME) == pytest.approx(1 / 3)


def test_eer_interpolates_between_roc_corners():
    scores = np.array([0.9, 0.8, 0.5, 0.6, 0.3])
    same = np.array([True, True, True, False, False])
    # Corners (FAR, TAR): (0, 2/3) at .8 and (1/2, 2/3) at .6. FAR - FRR goes -1/3 -> 1/6, so the
    # crossing is 2/3 of the way: FAR = 2/3 * 1/2 = 1/3, and FRR = 1 - 2/3 = 1/3 there too.
    assert eer(scores, same) == pytest.approx(1 / 3)


def test_tar_at_far_hand_worked():
    impostor = np.arange(10) / 10  # 0.0 .. 0.9
    genuine = np.array([0.95, 0.85, 0.75, 0.65, 0.05])
    scores = np.concatenate([genuine, impostor])
    same = np.arange(15) < 5
    # FAR 0: loosest threshold .95 accepts no impostor and 1 of 5 genuine -> .2
    assert tar_at_far(scores, same, 0.0) == pytest.approx(0.2)
    assert tar_at_far(scores, same, 0.05) == pytest.approx(0.2)
    # FAR .1: threshold .85 accepts impostor .9 only (1/10) and genuine .95, .85 -> .4
    assert tar_at_far(scores, same, 0.1) == pytest.approx(0.4)
    # FAR .2: threshold .75 accepts impostors .8, .9 and genuine .95, .85, .75 -> .6
    assert tar_at_far(scores, same, 0.2) == pytest.approx(0.6)
    # FAR .3 exactly (3 of 10; 1 - 7/10 would be 0.30000000000000004): threshold .65 -> .8
    assert tar_at_far(scores, same, 0.3) == pytest.approx(0.8)


def test_threshold_at_far_hand_worked():
    impostor = np.arange(10) / 10  # 0.0 .. 0.9
    # FAR .1 of 10 -> 1 false accept allowed: just above the 2nd highest (.8), only .9 accepted.
    t = threshold_at_far(impostor, 0.1)
    assert 0.8 < t < 0.8 + 1e-12 and np.mean(impostor >= t) == 0.1
    # FAR .25 -> floor(2.5) = 2 allowed: just above .7 (accepts .8 and .9, FAR .2).
    assert 0.7 < threshold_at_far(impostor, 0.25) < 0.7 + 1e-12
    # FAR 0 -> just above the highest impostor.
    assert 0.9 < threshold_at_far(impostor, 0.0) < 0.9 + 1e-12
    # 0.29 * 100 is 28.999999999999996 in floating point; 29 false accepts are still allowed.
    hundred = np.arange(100) / 100
    assert np.mean(hundred >= threshold_at_far(hundred, 0.29)) == pytest.approx(0.29)
    # Ties: .5 .5 .5 .1 at FAR .25 -> 1 allowed, but the 2nd highest ties the 1st: none accepted.
    assert 0.5 < threshold_at_far(np.array([0.5, 0.5, 0.5, 0.1]), 0.25) < 0.5 + 1e-12
    with pytest.raises(ValueError):
        threshold_at_far(impostor, 1.0)


def test_verification_accuracy_hand_worked():
    # Threshold .5 accepts .9 .8 .7: wrong on genuine .4 and impostor .7 -> 4 of 6.
    assert verification_accuracy(V_SCORES, V_SAME, 0.5) == pytest.approx(4 / 6)
    # Threshold .4 (accept >=) also accepts genuine .4: only .7 wrong -> 5 of 6.
    assert verification_accuracy(V_SCORES, V_SAME, 0.4) == pytest.approx(5 / 6)


def test_best_accuracy_threshold_hand_worked():
    # Sorted .2 .3 .4 .7 .8 .9 with labels I I G I G G. Right answers per candidate threshold:
    # .2 (all accepted) 3, .25: 4, .35: 5, .55: 4, .75: 5, .85: 4, above .9 (none accepted) 3.
    # Best is 5, first reached at the midpoint .35.
    t = best_accuracy_threshold(V_SCORES, V_SAME)
    assert t == pytest.approx(0.35)
    assert verification_accuracy(V_SCORES, V_SAME, t) == pytest.approx(5 / 6)


def test_verification_needs_both_kinds_of_pairs():
    with pytest.raises(ValueError, match="both"):
        auc(np.array([0.1, 0.2]), np.array([True, True]))


def test_open_set_auroc_hand_worked():
    # Known top-1 .9 .6 .4 vs unknown .5 .3: .9 > both, .6 > both, .4 > .3 -> 5 of 6 pairs.
    assert open_set_auroc(np.array([0.9, 0.6, 0.4]), np.array([0.5, 0.3])) == pytest.approx(5 / 6)
    assert open_set_auroc(np.array([0.5]), np.array([0.5])) == pytest.approx(0.5)  # a tie counts half
    rng = np.random.default_rng(4)
    known, unknown = np.round(rng.normal(1, 1, 50), 1), np.round(rng.normal(0, 1, 30), 1)
    oracle = roc_auc_score(np.r_[np.ones(50), np.zeros(30)], np.r_[known, unknown])
    assert open_set_auroc(known, unknown) == pytest.approx(oracle)


def test_decision_prf_hand_worked():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2])
    correct = np.array([True, False, True, False, False])
    known = np.array([True, True, True, False, False])
    # At .5, matches: q0 (known, right: TP), q1 (known, wrong individual), q3 (unknown) -> 3 answers.
    # precision 1/3; recall 1/3 (1 of 3 known); F1 = 2*1 / (3 + 3) = 1/3; unknown q4 rejected: 1/2.
    d = decision_prf(scores, correct, known, 0.5)
    assert d.precision == pytest.approx(1 / 3) and d.recall == pytest.approx(1 / 3)
    assert d.f1 == pytest.approx(1 / 3) and d.unknown_accuracy == pytest.approx(0.5)
    # Threshold above everything: nothing matched -> precision undefined, recall 0, unknowns all right.
    d = decision_prf(scores, correct, known, 1.0)
    assert math.isnan(d.precision) and d.recall == 0.0 and d.f1 == 0.0 and d.unknown_accuracy == 1.0


def test_thresholds_are_exact_for_float32_scores():
    # Next to a float32 score, a float64 threshold would round back onto it when numpy compares in
    # float32 (NEP 50) and accept one impostor too many; thresholds are taken in float32 instead.
    impostor = (np.arange(1000) / 997).astype(np.float32)
    t = threshold_at_far(impostor, 0.01)  # 10 of 1,000 allowed
    assert np.mean(impostor >= t) == 0.01 and np.mean(impostor.astype(np.float64) >= t) == 0.01
    scores = np.array([0.5, np.nextafter(np.float32(0.5), np.float32(1))], dtype=np.float32)
    same = np.array([False, True])
    t = best_accuracy_threshold(scores, same)  # adjacent floats: no midpoint, the genuine score itself
    assert verification_accuracy(scores, same, t) == 1.0
