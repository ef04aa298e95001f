"""training.open_set against hand-worked examples (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.special import betainc, betaincinv

from training.open_set import (
    CONFIDENCE_GRID,
    MATCH_CONFIDENCE_FLOORS,
    MIN_CALIBRATION_INDIVIDUALS,
    THRESHOLD_GRID,
    ConfidenceModel,
    DistractorTail,
    GalleryAnchor,
    OpenSetCalibration,
    QueryScores,
    bootstrap_weights,
    calibrate_open_set,
    conservative_thresholds,
    distractor_cdf,
    floored_match_chance,
    herd_check,
    herd_mates,
    identification_rates,
    image_exponent,
    isotonic,
    logistic_regression,
    max_quantile,
    right_regression,
    sampled_top2,
    sigmoid,
    stranger_match_chance,
    threshold_for_fpir,
)

# One stranger whose best scores against four other individuals are .2 .4 .6 .8, and one enrolled
# query: .7 with its own individual, .1 and .75 with two others.
SCORES = QueryScores(
    genuine=np.array([math.nan, 0.7]),
    distractors=[np.array([0.2, 0.4, 0.6, 0.8]), np.array([0.1, 0.75])],
    top2=np.array([[0.8, 0.6], [0.75, 0.7]]),
    top1_correct=np.array([False, False]),
    images_per_individual=2.0,
)


def test_rates_for_a_gallery_of_two_individuals() -> None:
    # k = 2 individuals in the gallery.
    # t = .5: the stranger's distractors below .5: 2 of 4 -> F = .5; FPIR = 1 - .5^2 = .75.
    #         the enrolled query: .7 >= .5, and its one distractor (k - 1 = 1) is below .7 with
    #         probability 1/2 (.1 yes, .75 no) -> TPIR = .5.
    # t = .8: F = 3/4 -> FPIR = 1 - 9/16 = .4375; .7 < .8 -> TPIR = 0.
    # t = .9: F = 1 -> FPIR = 0.
    fpir, tpir = identification_rates(SCORES, np.array([0.5, 0.8, 0.9]), 2)
    np.testing.assert_allclose(fpir, [0.75, 0.4375, 0.0])
    np.testing.assert_allclose(tpir, [0.5, 0.0, 0.0])


def test_a_larger_gallery_raises_fpir_and_lowers_tpir() -> None:
    # k = 4 at t = .5: FPIR = 1 - .5^4 = .9375; TPIR = .5^3 = .125
    fpir, tpir = identification_rates(SCORES, np.array([0.5]), 4)
    np.testing.assert_allclose(fpir, [0.9375])
    np.testing.assert_allclose(tpir, [0.125])


def test_threshold_for_fpir_is_the_smallest_that_meets_the_target() -> None:
    thresholds = np.array([0.1, 0.2, 0.3, 0.4])
    fpir = np.array([0.5, 0.2, 0.05, 0.0])
    assert threshold_for_fpir(thresholds, fpir, 0.2) == 0.2
    assert threshold_for_fpir(thresholds, fpir, 0.1) == 0.3
    assert threshold_for_fpir(thresholds, fpir, 0.0) == 0.4


def test_isotonic_pools_adjacent_violators() -> None:
    # y = 0 1 0 1 1 at x = 1..5: the violating pair (1, 0) at x = 2, 3 pools to .5 at x = 2.5.
    xs, ys = isotonic(np.array([5.0, 1, 3, 2, 4]), np.array([1.0, 0, 0, 1, 1]))
    np.testing.assert_allclose(xs, [1.0, 2.5, 4.0, 5.0])
    np.testing.assert_allclose(ys, [0.0, 0.5, 1.0, 1.0])
    # 1 0 0: everything pools to the mean 1/3 at the mean x 2
    xs, ys = isotonic(np.array([1.0, 2, 3]), np.array([1.0, 0, 0]))
    np.testing.assert_allclose(xs, [2.0])
    np.testing.assert_allclose(ys, [1 / 3])


def test_the_sampled_best_follows_the_distribution_of_the_maximum() -> None:
    # The stranger, k = 2: max of two draws from {.2, .4, .6, .8} is .8 with probability
    # 1 - (3/4)^2 = 7/16.
    stranger_only = QueryScores(
        genuine=np.array([math.nan]),
        distractors=[np.array([0.2, 0.4, 0.6, 0.8])],
        top2=np.zeros((1, 2)),
        top1_correct=np.array([False]),
        images_per_individual=1.0,
    )
    top, _, right, _ = sampled_top2(stranger_only, 2, np.random.default_rng(0), draws=20000)
    assert not right.any()
    assert abs(float(np.mean(top == 0.8)) - 7 / 16) < 0.01


TABLE = OpenSetCalibration(
    gallery_sizes=[10, 1000],
    target_fpirs=[0.01, 0.1],
    thresholds=[[0.6, 0.4], [0.8, 0.6]],
    tpir=[[0.5, 0.7], [0.3, 0.5]],
    confidence_similarity=[0.0, 1.0],
    confidence=[[0.0, 1.0], [0.0, 0.5]],
    images_per_individual=2.0,
)


def test_table_interpolates_in_log_gallery_size_and_log_fpir() -> None:
    # 100 is halfway between 10 and 1000 in log: thresholds .7 (FPIR .01) and .5 (FPIR .1);
    # FPIR .0316 is halfway between .01 and .1 in log: .6
    assert TABLE.threshold(100, 0.01) == pytest.approx(0.7)
    assert TABLE.threshold(100, 0.1) == pytest.approx(0.5)
    assert TABLE.threshold(100, math.sqrt(0.001)) == pytest.approx(0.6)
    # clamped outside the table
    assert TABLE.threshold(1, 0.01) == pytest.approx(0.6)
    assert TABLE.threshold(10**6, 0.001) == pytest.approx(0.8)
    assert TABLE.expected_tpir(100, 0.01) == pytest.approx(0.4)
    # confidence at similarity .5: .5 at 10 images, .25 at 1000, .375 at 100
    assert TABLE.probability(0.5, 100) == pytest.approx(0.375)


def test_table_round_trips_and_refuses_mismatched_shapes() -> None:
    again = OpenSetCalibration.from_dict(TABLE.to_dict())
    assert again.to_dict() == TABLE.to_dict()
    bad = TABLE.to_dict() | {"thresholds": [[0.6, 0.4]]}
    with pytest.raises(ValueError, match="rows and columns"):
        OpenSetCalibration.from_dict(bad)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_image_exponent_is_one_for_unrelated_photos_and_zero_for_copies_of_one() -> None:
    rng = np.random.default_rng(0)
    individuals = np.repeat([f"a{i}" for i in range(100)], 8)
    # every photo unlike every other, its own animal's included: 8 photos are 8 chances
    unrelated = image_exponent(_unit(rng.normal(size=(800, 24))), individuals)
    # every photo of an animal the same vector: 8 photos are one chance
    copies = image_exponent(np.repeat(_unit(rng.normal(size=(100, 24))), 8, axis=0), individuals)
    # between: photos scattered about their animal's own direction
    centres = np.repeat(_unit(rng.normal(size=(100, 24))), 8, axis=0)
    between = image_exponent(_unit(centres + 0.05 * rng.normal(size=(800, 24))), individuals)
    assert unrelated == pytest.approx(1.0, abs=0.05)
    assert copies == pytest.approx(0.0, abs=1e-9)
    assert 0.1 < between < 0.9
    # one photo per animal cannot show it: read by images, as before the exponent
    assert image_exponent(rng.normal(size=(50, 8)), [f"a{i}" for i in range(50)]) == 1.0


def test_a_gallery_is_read_by_its_images_at_exponent_one_and_by_its_individuals_at_zero() -> None:
    shape = {1: 30, 4: 10, 9: 2}  # 88 images of 42 individuals
    assert replace(TABLE, image_exponent=1.0).equivalent_size(shape) == 88
    assert replace(TABLE, image_exponent=0.0).equivalent_size(shape) == 84  # 42 x 2.0
    # 10 x 2 x 2 ** 0.5 + 2 x 2 x 4.5 ** 0.5: between 24 individuals x 2.0 and the 58 images
    assert replace(TABLE, image_exponent=0.5).equivalent_size({4: 10, 9: 2}) == 37
    assert replace(TABLE, image_exponent=0.5).equivalent_size({}) == 0
    again = OpenSetCalibration.from_dict(replace(TABLE, image_exponent=0.7).to_dict())
    assert again.image_exponent == 0.7
    older = {k: v for k, v in TABLE.to_dict().items() if k != "image_exponent"}  # a card from before it
    assert OpenSetCalibration.from_dict(older).image_exponent == 1.0
    with pytest.raises(ValueError, match="image_exponent"):
        OpenSetCalibration.from_dict(TABLE.to_dict() | {"image_exponent": 1.5})


def test_the_herd_check_finds_the_look_alikes_a_table_lets_through() -> None:
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(20, 64)))
    centres[1] = _unit(centres[:1] + 0.01 * rng.normal(size=(1, 64)))[0]  # animals 0 and 1 look alike
    emb = _unit(np.repeat(centres, 5, axis=0) + 0.02 * rng.normal(size=(100, 64)))
    individuals = np.repeat([f"a{i}" for i in range(20)], 5).tolist()
    size, rows = herd_mates(emb, individuals, TABLE, targets=(0.01, 0.1))
    assert size == 100  # 100 images at the table's exponent of one
    strict, lax = rows
    assert (strict.target, strict.threshold, lax.threshold) == (0.01, pytest.approx(0.7), pytest.approx(0.5))
    # the two look-alikes' 10 photos pass, nobody else's (random directions in 64 dimensions)
    assert strict.past == lax.past == pytest.approx(0.1)
    assert strict.interval[0] < 0.1 < strict.interval[1] <= 0.4  # two lumps among 20 animals
    assert strict.holding > 0.95  # a 1% threshold on this herd sits among the look-alikes
    asked = herd_mates(emb, individuals, TABLE, max_queries=30)[1][0]
    assert 0.0 <= asked.past <= 1.0
    with pytest.raises(ValueError, match="two individuals"):
        herd_mates(emb[:5], individuals[:5], TABLE)

    # Read in blocks, as a deployment's stored vectors are, the gallery gives the same figures.
    _, code = np.unique(individuals, return_inverse=True)
    for max_queries in (30, 5000):
        in_blocks = herd_check(
            code,
            lambda asked: emb[asked],
            lambda: ((emb[i : i + 7], code[i : i + 7]) for i in range(0, len(code), 7)),
            TABLE,
            targets=(0.01, 0.1),
            max_queries=max_queries,
        )
        whole = herd_mates(emb, individuals, TABLE, targets=(0.01, 0.1), max_queries=max_queries)
        assert in_blocks[0] == whole[0]
        for a, b in zip(in_blocks[1], whole[1], strict=True):  # products of other shapes: last-bit sums
            assert (a.target, a.threshold, a.past, a.interval) == (b.target, b.threshold, b.past, b.interval)
            assert a.holding == pytest.approx(b.holding, abs=1e-6)


def test_calibration_of_clustered_embeddings(clusters) -> None:
    emb, individuals, groups = clusters(40, 6, noise=0.12, seed=3)
    table = calibrate_open_set(emb, individuals, groups, seed=0, repeats=2, gallery_sizes=(10, 100, 1000))
    thresholds = np.array(table.thresholds)
    # a larger gallery needs a higher threshold for the same FPIR; a lower FPIR a higher one too
    assert (np.diff(thresholds, axis=0) >= 0).all()
    assert (np.diff(thresholds, axis=1) <= 0).all()
    assert table.images_per_individual == pytest.approx(3.0)
    # 30 enrolled individuals x 3 queries x 2 repeats; 10 strangers x 6 images x 2 repeats
    assert table.counts["enrolled_queries"] == 180
    assert table.counts["stranger_queries"] == 120
    conf = np.array(table.confidence)
    assert (np.diff(conf, axis=1) >= -1e-9).all() and conf.min() >= 0 and conf.max() <= 1
    assert set(table.curves) == {10, 100, 1000}
    # a minimum match confidence holds strangers back: its thresholds are no higher, and a higher
    # floor's no higher still; they survive the card
    floors = sorted(table.floor_thresholds)
    assert floors == list(MATCH_CONFIDENCE_FLOORS)
    stacked = np.array([thresholds] + [table.floor_thresholds[f] for f in floors])
    assert (np.diff(stacked, axis=0) <= 1e-12).all()
    again = OpenSetCalibration.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.threshold(300, 0.01, 0.5) == pytest.approx(table.threshold(300, 0.01, 0.5), abs=1e-4)
    assert again.threshold(300, 0.01, 0.5) <= again.threshold(300, 0.01)


def test_conservative_threshold_is_a_quantile_over_resampled_strangers() -> None:
    # Two strangers: A matches only at threshold .1, B at .1 and .2. Target FPIR .25.
    # Resample {A, A}: FPIR .1/.2/.3 = 1, 0, 0 -> .2;  {B, B}: 1, 1, 0 -> .3;  {A, B}: 1, .5, 0 -> .3
    thresholds = np.array([0.1, 0.2, 0.3])
    chance = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    weights = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert conservative_thresholds(thresholds, chance, weights, [0.25], 0.0) == [0.2]
    assert conservative_thresholds(thresholds, chance, weights, [0.25], 0.5) == [0.3]
    # several targets at once; a target of 1 is met at the lowest threshold by every resample
    assert conservative_thresholds(thresholds, chance, weights, [0.25, 1.0], 0.5) == [0.3, 0.1]
    # every resample draws as many individuals as there are, whole individuals at a time
    drawn = bootstrap_weights(np.array(["a", "a", "b", "c"]), 50, np.random.default_rng(0))
    assert drawn.shape == (50, 4)
    assert (drawn[:, 0] == drawn[:, 1]).all()
    assert (drawn[:, [0, 2, 3]].sum(axis=1) == 3).all()


def beta_scores(
    seed: int, queries: int = 2000, enrolled_share: float = 0.0
) -> tuple[QueryScores, np.ndarray]:
    """Queries with 100 distractor scores each, as a validation set of about 100 individuals gives:
    query q's scores follow Beta(a_q, b_q) (mean about .42, spread about .1, a tail that ends at 1,
    like the dog model's similarities); the first ``enrolled_share`` of the queries also have a
    genuine score, Beta(20, 6) (mean about .77). Returns the scores and the (a, b) of each query."""
    rng = np.random.default_rng(seed)
    ab = np.stack([rng.uniform(8, 12, queries), rng.uniform(12, 15, queries)], axis=1)
    genuine = np.where(np.arange(queries) < queries * enrolled_share, rng.beta(20, 6, queries), np.nan)
    scores = QueryScores(
        genuine=genuine,
        distractors=[np.sort(rng.beta(a, b, 100)) for a, b in ab],
        top2=np.zeros((queries, 2)),
        top1_correct=np.zeros(queries, dtype=bool),
        images_per_individual=1.0,
    )
    return scores, ab


@pytest.mark.parametrize("individuals", [1000, 10000])
@pytest.mark.parametrize("target", [0.01, 0.05])
def test_thresholds_for_galleries_beyond_the_validation_data_meet_their_target(individuals, target) -> None:
    # 100 distractors per query: the empirical F_q is 1 above each query's highest score, so for 1,000
    # or 10,000 individuals a purely empirical table lets 7-57 times the target through. With the
    # pooled tail the true FPIR (from the known Beta distributions) is within a factor 1.5. Over other
    # seeds the tail errs strict: at 10,000 individuals and 1% the true FPIR ranged 0.34-1.0 times the
    # target over seeds 0-7 (1,000 individuals: 0.56-1.12).
    scores, ab = beta_scores(seed=0)
    fpir, _ = identification_rates(scores, THRESHOLD_GRID, individuals)
    t = threshold_for_fpir(THRESHOLD_GRID, fpir, target)
    true_fpir = float(np.mean(1.0 - betainc(ab[:, 0], ab[:, 1], t) ** individuals))
    assert target / 1.5 <= true_fpir <= target * 1.5


def expected_calibration_error(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> float:
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    return float(
        sum(
            np.mean(which == b) * abs(confidence[which == b].mean() - right[which == b].mean())
            for b in range(bins)
            if (which == b).any()
        )
    )


@pytest.mark.parametrize("individuals", [1000, 10000])
def test_confidence_for_galleries_beyond_the_validation_data_is_calibrated(individuals) -> None:
    # The confidence curve is fitted on top-1 scores drawn for galleries of that size; drawn from the
    # empirical scores alone, a stranger's best distractor never exceeds its highest of 100, so high
    # similarities look always right (ECE 0.29 at 1,000 individuals, 0.61 at 10,000). Measured on
    # fresh galleries drawn from the true distributions, the tail keeps the ECE under 0.05.
    scores, ab = beta_scores(seed=0, enrolled_share=0.6)
    top, _, right, _ = sampled_top2(scores, individuals, np.random.default_rng(0))
    xs, ys = isotonic(top, right.astype(np.float64))
    curve = np.interp(CONFIDENCE_GRID, xs, ys)
    rng = np.random.default_rng(1)
    others = np.where(scores.is_stranger, individuals, individuals - 1)[:, None]
    best_other = betaincinv(ab[:, :1], ab[:, 1:], rng.random((len(ab), 4)) ** (1.0 / others))
    genuine = np.repeat(scores.genuine[:, None], 4, axis=1)
    truly_right = ~np.isnan(genuine) & (genuine >= best_other)
    truly_top = np.where(truly_right, genuine, best_other)
    confidence = np.interp(truly_top.ravel(), CONFIDENCE_GRID, curve)
    assert expected_calibration_error(confidence, truly_right.ravel().astype(np.float64)) <= 0.05


def test_the_tail_recovers_a_power_of_one_minus_the_score_and_splices_onto_each_query() -> None:
    # Scores 1 - U ** (1 / 8) have survival exactly (1 - t) ** 8: the fitted power is about 8.
    rng = np.random.default_rng(0)
    distractors = [np.sort(1.0 - rng.random(100) ** (1 / 8)) for _ in range(2000)]
    tail = DistractorTail.fit(distractors)
    assert tail is not None and tail.power == pytest.approx(8.0, rel=0.1)
    assert tail.survival(np.array([0.6]))[0] == pytest.approx(0.4**8, rel=0.3)
    # A query's F_q: its own empirical share up to the level, then rising smoothly past its maximum
    d = distractors[0]
    t = np.linspace(0.0, 1.0, 2001)
    f = distractor_cdf(d, t, tail)
    assert (np.diff(f) >= 0).all() and f[-1] == 1.0
    assert (f[t > d[-1]] < 1.0).any()
    below_level = t < tail.level
    np.testing.assert_allclose(f[below_level], np.searchsorted(d, t[below_level]) / d.size)
    # the quantile inverts it, in the empirical part and in the tail
    x = max_quantile(d, 0.5, tail)
    assert distractor_cdf(d, np.array([x]), tail)[0] == pytest.approx(0.5, abs=0.011)
    for p in (0.995, 1 - 1e-6):
        x = max_quantile(d, p, tail)
        assert 1 - distractor_cdf(d, np.array([x]), tail)[0] == pytest.approx(1 - p, rel=0.01)
    # too few scores for a tail: the hand-worked empirical rates above stay exact
    assert DistractorTail.fit(SCORES.distractors) is None and SCORES.tail is None


def test_sampled_top2_follows_the_distribution_of_the_two_best() -> None:
    # The stranger, k = 2: the second best of two draws from {.2, .4, .6, .8} is their minimum:
    # .2 with probability 1 - (3/4)^2 = 7/16, .8 with (1/4)^2 = 1/16.
    # The enrolled query (genuine .7; distractors .1 and .75), k = 3: two draws from {.1, .75};
    # best .75 and wrong unless both are .1 (1/4): then best .7 (right), second .1.
    scores = QueryScores(
        genuine=np.array([math.nan, 0.7]),
        distractors=[np.array([0.2, 0.4, 0.6, 0.8]), np.array([0.1, 0.75])],
        top2=np.zeros((2, 2)),
        top1_correct=np.zeros(2, dtype=bool),
        images_per_individual=1.0,
    )
    n = 20000
    best, second, right, stranger = sampled_top2(scores, 2, np.random.default_rng(0), draws=n)
    assert stranger[:n].all() and not stranger[n:].any() and not right[:n].any()
    assert (best[:n] >= second[:n]).all()
    assert abs(float(np.mean(second[:n] == 0.2)) - 7 / 16) < 0.01
    assert abs(float(np.mean(second[:n] == 0.8)) - 1 / 16) < 0.01
    best, second, right, _ = sampled_top2(scores, 3, np.random.default_rng(1), draws=n)
    assert abs(float(right[n:].mean()) - 1 / 4) < 0.01
    assert (best[n:][right[n:]] == 0.7).all() and (second[n:][right[n:]] == 0.1).all()
    # wrong: best .75, second .7 (one .1 drawn) or .75 (both .75: 1/4 of all)
    assert abs(float(np.mean(second[n:] == 0.75)) - 1 / 4) < 0.01


def test_logistic_regression_recovers_its_coefficients_and_counts_weights_as_repeats() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(20000), rng.uniform(0, 1, 20000), rng.uniform(0, 0.5, 20000)])
    truth = np.array([-4.0, 5.0, 6.0])
    y = (rng.random(20000) < sigmoid(x @ truth)).astype(np.float64)
    assert logistic_regression(x, y, np.ones(20000)) == pytest.approx(truth, abs=0.3)
    # a weight of 2 is the same row twice
    small_x, small_y = x[:300], y[:300]
    doubled = logistic_regression(
        np.vstack([small_x, small_x[:100]]), np.r_[small_y, small_y[:100]], np.ones(400)
    )
    weighted = logistic_regression(small_x, small_y, np.r_[np.full(100, 2.0), np.ones(200)])
    assert weighted == pytest.approx(doubled, abs=1e-6)
    # separable data stays finite (the ridge)
    assert np.isfinite(logistic_regression(x[:10], (x[:10, 1] > 0.5).astype(np.float64), np.ones(10))).all()


MODEL = ConfidenceModel(
    enrolled_logit=[[0.0, 0.0, 0.0], [-2.0, 0.0, 0.0]],  # likelihood ratio 1 at 10 images, e^-2 at 1,000
    right_logit=[[0.0, 0.0, 4.0], [0.0, 0.0, 4.0]],  # log odds right = 4 * margin
    stranger_share=0.5,
    max_margin=0.5,
)


def test_confidence_model_splits_by_bayes_with_the_share_of_strangers_as_prior() -> None:
    # 10 images, margin .25: P(right | enrolled) = sigmoid(1); likelihood ratio 1, so
    # P(enrolled) = 1 - share: .5 at the card's share, .9 at a share of .1, 1 at 0.
    right = 1 / (1 + math.exp(-1.0))
    assert MODEL.probability(0, 0.8, 0.55, 0.5) == pytest.approx(0.5 * right)
    assert MODEL.probability(0, 0.8, 0.55, 0.1) == pytest.approx(0.9 * right)
    assert MODEL.probability(0, 0.8, 0.55, 0.0) == pytest.approx(right)
    # no second individual, or a margin beyond the fitted ones: the largest fitted margin (.5)
    assert MODEL.probability(0, 0.8, None, 0.0) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert MODEL.probability(0, 0.8, -0.9, 0.0) == MODEL.probability(0, 0.8, None, 0.0)


def test_table_with_a_confidence_model_interpolates_it_and_older_cards_keep_their_curve() -> None:
    table = OpenSetCalibration.from_dict(TABLE.to_dict() | {"confidence_model": MODEL.to_dict()})
    assert table.confidence_model == MODEL
    assert OpenSetCalibration.from_dict(table.to_dict()).to_dict() == table.to_dict()
    # 100 images: halfway (in log size) between the 10 and 1,000 rows, at the card's share .5
    right = 1 / (1 + math.exp(-1.0))
    at_1000 = 1 / (1 + math.exp(2.0)) * right
    assert table.probability(0.8, 100, 0.55) == pytest.approx((0.5 * right + at_1000) / 2)
    assert table.probability(0.8, 100, 0.55, stranger_share=0.0) == pytest.approx(right)
    assert table.stranger_share == 0.5
    # a card without it (older) answers from the curve on similarity alone, whatever the second
    assert TABLE.confidence_model is None and "confidence_model" not in TABLE.to_dict()
    assert TABLE.probability(0.5, 100, 0.45, stranger_share=0.0) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="one row of three"):
        OpenSetCalibration.from_dict(
            TABLE.to_dict() | {"confidence_model": MODEL.to_dict() | {"right_logit": [[0.0]]}}
        )


def test_thresholds_for_floors_are_read_from_the_highest_stored_floor_not_above_the_asked_one() -> None:
    floors = {0.5: [[0.5, 0.3], [0.7, 0.5]], 0.7: [[0.4, 0.2], [0.6, 0.4]]}
    table = OpenSetCalibration.from_dict(
        OpenSetCalibration.to_dict(replace(TABLE, confidence_model=MODEL, floor_thresholds=floors))
    )
    assert table.floor_thresholds == floors
    # 100 images, FPIR .01: plain .7, floor .5 -> .6, floor .7 -> .5; .6 reads .5's, .3 none
    assert [table.threshold(100, 0.01, f) for f in (None, 0.0, 0.3, 0.5, 0.6, 0.7, 0.95)] == pytest.approx(
        [0.7, 0.7, 0.7, 0.6, 0.6, 0.5, 0.5]
    )
    # a share of strangers below the calibration's (.5) reads the plain thresholds; above, the floor's
    assert table.threshold(100, 0.01, 0.5, stranger_share=0.2) == pytest.approx(0.7)
    assert table.threshold(100, 0.01, 0.5, stranger_share=0.8) == pytest.approx(0.6)
    stored = table.to_dict()
    with pytest.raises(ValueError, match="no confidence model"):
        OpenSetCalibration.from_dict({k: v for k, v in stored.items() if k != "confidence_model"})
    with pytest.raises(ValueError, match="rows and columns"):
        OpenSetCalibration.from_dict(
            stored | {"match_confidence_floors": {"floors": [0.5], "thresholds": [[[0.5, 0.3]]]}}
        )
    with pytest.raises(ValueError, match="one threshold table per floor"):
        OpenSetCalibration.from_dict(
            stored | {"match_confidence_floors": {"floors": [0.5, 0.7], "thresholds": [floors[0.5]]}}
        )


def true_top2(ab: np.ndarray, genuine: np.ndarray, individuals: int, rng: np.random.Generator, draws: int):
    """Best and second similarity and whether the best is right, for ``draws`` galleries per query
    drawn from the true Beta distributions of :func:`beta_scores`."""
    others = np.where(np.isnan(genuine), individuals, individuals - 1)[:, None].astype(np.float64)
    p1 = rng.random((len(ab), draws)) ** (1.0 / others)
    d1 = betaincinv(ab[:, :1], ab[:, 1:], p1)
    d2 = betaincinv(ab[:, :1], ab[:, 1:], p1 * rng.random((len(ab), draws)) ** (1.0 / (others - 1.0)))
    g = np.repeat(genuine[:, None], draws, axis=1)
    right = ~np.isnan(g) & (g >= d1)
    best = np.where(right, g, d1)
    second = np.where(right, d1, np.where(~np.isnan(g) & (g >= d2), g, d2))
    return best.ravel(), second.ravel(), right.ravel()


def validation_anchor(ab: np.ndarray, scores: QueryScores) -> GalleryAnchor:
    """Galleries of 100 individuals (the validation data's size) drawn from the true distributions
    of :func:`beta_scores`, and drawn from its scores at that size."""
    best, second, right = true_top2(ab, scores.genuine, 100, np.random.default_rng(2), 1)
    return GalleryAnchor(
        (best, second, right, scores.is_stranger), sampled_top2(scores, 100, np.random.default_rng(3))
    )


def test_an_anchor_sets_the_drawn_chance_of_a_right_best_against_the_validation_galleries() -> None:
    # Each size's regression is the drawn galleries' at that size plus (validation galleries minus
    # galleries drawn at their size); the likelihood ratio of strangers is the drawn galleries' alone.
    scores, ab = beta_scores(seed=0, enrolled_share=0.6)
    draws = [sampled_top2(scores, n, np.random.default_rng(n)) for n in (10, 1000)]
    best, second, right = true_top2(ab, scores.genuine, 100, np.random.default_rng(2), 1)
    anchor = GalleryAnchor(
        (best, second, right, scores.is_stranger), sampled_top2(scores, 100, np.random.default_rng(3))
    )
    plain, anchored = ConfidenceModel.fit(draws), ConfidenceModel.fit(draws, anchor)
    assert (plain.anchored, anchored.anchored) == (False, True)
    assert anchored.enrolled_logit == plain.enrolled_logit
    m = anchored.max_margin
    shift = right_regression(*anchor.real, m) - right_regression(*anchor.drawn, m)
    for row, draw in zip(anchored.right_logit, draws, strict=True):
        assert row == pytest.approx((right_regression(*draw, m) + shift).tolist())
    assert ConfidenceModel.from_dict(anchored.to_dict(), 2).anchored
    assert not ConfidenceModel.from_dict(plain.to_dict() | {"anchored": None}, 2).anchored  # older cards


@pytest.mark.parametrize(("individuals", "anchored"), [(MIN_CALIBRATION_INDIVIDUALS, True), (20, False)])
def test_the_calibration_anchors_the_confidence_from_enough_validation_individuals(
    clusters, individuals, anchored
) -> None:
    emb, names, groups = clusters(individuals, 6, noise=0.3, seed=3)
    table = calibrate_open_set(emb, names, groups, seed=0, repeats=2, gallery_sizes=(10, 100))
    assert table.confidence_model is not None and table.confidence_model.anchored is anchored


@pytest.mark.parametrize("stranger_share", [None, 0.0])
def test_confidence_model_is_calibrated_on_fresh_galleries_at_the_fitted_and_another_share(
    stranger_share,
) -> None:
    # The likelihood ratio fitted on galleries of 1,000 individuals drawn from 100 scores per query
    # (the tail beyond), the chance of a right best on enrolled queries of real galleries of that
    # size; measured on fresh galleries drawn from the true distributions: at the calibration's mix
    # of strangers (40% of queries), and for enrolled queries alone with the prior set to no strangers.
    scores, ab = beta_scores(seed=0, enrolled_share=0.6)
    model = ConfidenceModel.fit(
        [sampled_top2(scores, 1000, np.random.default_rng(0))], validation_anchor(ab, scores)
    )
    assert model.stranger_share == pytest.approx(0.4)
    best, second, right = true_top2(ab, scores.genuine, 1000, np.random.default_rng(1), 4)
    asked = np.ones(best.shape, dtype=bool) if stranger_share is None else ~np.repeat(scores.is_stranger, 4)
    share = model.stranger_share if stranger_share is None else stranger_share
    confidence = np.array(
        [model.probability(0, b, s, share) for b, s in zip(best[asked], second[asked], strict=True)]
    )
    assert expected_calibration_error(confidence, right[asked].astype(np.float64)) <= 0.03


def test_with_no_margin_needed_the_floored_chance_is_the_plain_one_and_with_none_enough_zero() -> None:
    scores, _ = beta_scores(seed=0, queries=200)
    plain = stranger_match_chance(scores, THRESHOLD_GRID, 1000)
    zero = floored_match_chance(scores, THRESHOLD_GRID, 1000, np.zeros(THRESHOLD_GRID.size))
    np.testing.assert_allclose(zero, plain, atol=1e-12)
    never = floored_match_chance(scores, THRESHOLD_GRID, 1000, np.full(THRESHOLD_GRID.size, np.inf))
    assert not never.any()


@pytest.mark.parametrize(("individuals", "floor"), [(100, 0.7), (1000, 0.5)])
def test_thresholds_for_a_minimum_confidence_keep_the_target_on_fresh_galleries(individuals, floor) -> None:
    # The confidence fitted on galleries drawn from 100 scores per query; strangers' galleries then
    # drawn from the true Beta distributions. A match needs both the threshold and the floor. With
    # the plain threshold the floor takes the FPIR to 0.71-0.74 times a 5% target (seed 1); with the
    # floor's own threshold, lower, it is 0.84-0.94 times the target.
    target = 0.05
    scores, ab = beta_scores(seed=0, enrolled_share=0.6)
    model = ConfidenceModel.fit([sampled_top2(scores, individuals, np.random.default_rng(0))])
    share = model.stranger_share
    plain = threshold_for_fpir(
        THRESHOLD_GRID, stranger_match_chance(scores, THRESHOLD_GRID, individuals).mean(axis=0), target
    )
    margins = model.floor_margins(0, THRESHOLD_GRID, floor, share)
    chance = floored_match_chance(scores, THRESHOLD_GRID, individuals, margins).mean(axis=0)
    lowered = threshold_for_fpir(THRESHOLD_GRID, chance, target)
    strangers = scores.is_stranger
    best, second, _ = true_top2(
        ab[strangers], scores.genuine[strangers], individuals, np.random.default_rng(1), 200
    )
    confident = model.probabilities(0, best, second, share) >= floor
    with_plain = float(np.mean((best >= plain) & confident))
    with_lowered = float(np.mean((best >= lowered) & confident))
    assert lowered < plain
    assert target / 1.25 <= with_lowered <= target * 1.25
    assert abs(with_lowered - target) < abs(with_plain - target)
