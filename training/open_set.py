"""Open-set calibration of 1:N identification: thresholds per gallery size, and a confidence.

A pair threshold (false-accept rate on image pairs) says little about a search: a stranger is
compared with every enrolled individual, and the chance that one of them scores above the
threshold grows with the gallery. This module simulates galleries on validation individuals:

* per seeded repeat, a share of the individuals is never enrolled (strangers: every image a query);
  the others have about half their images enrolled and the rest queried (groups kept together);
* for every query, its best similarity to each enrolled individual: the *genuine* score (its own
  individual) and the *distractor* scores (every other enrolled individual);
* a gallery of ``n`` images holds ``k = n / m`` individuals (``m`` enrolled images per individual
  on average): the query's own individual (for an enrolled one) plus distractors drawn at random
  from its distractor scores. With ``F_q(t)`` the share of query ``q``'s distractor scores below
  ``t`` (with a fitted tail above its highest ones: below), the chance that none of ``k`` reaches
  ``t`` is ``F_q(t) ** k``. So, for any gallery size:

  - FPIR(t, n), strangers answered ``match``:  mean over strangers of ``1 - F_s(t) ** k``
  - TPIR(t, n), enrolled queries answered ``match`` with the right individual:
    mean over them of ``[g_q >= t] * F_q(g_q) ** (k - 1)``
  - FNIR = 1 - TPIR.

Drawing distractors per *individual* (its best image) keeps the images of one animal together,
which is how the service ranks (best image per individual).

The table is indexed by images at the calibration's ``m`` enrolled images per individual. A gallery
whose animals have other numbers of photos is read through :func:`image_exponent` ``a``: an animal
with ``n`` photos counts as ``(n / m) ** a`` animals of ``m`` (:meth:`OpenSetCalibration.equivalent_size`),
since its photos are more alike than photos of as many different animals (``a`` below 1), yet each
is another chance to resemble a stranger (``a`` above 0).

A validation set holds only some 100 distractors per query, so the empirical ``F_q(t)`` is 1 above
the query's highest one, and ``F_q(t) ** k`` stops falling once a gallery is a few times larger than
the validation data: the thresholds would stop rising and the FPIR of large galleries would run
far above its target. So above a common level ``u`` (the top :data:`TAIL_LEVEL_SHARE` of every
query's distractor scores, pooled) each query keeps its own share above ``u`` and takes the shape
of its tail from the pooled scores (:class:`DistractorTail`): ``1 - F_q(t) = (1 - F_q(u)) *
S(t) / S(u)``, with ``S`` the pooled scores' survival. ``S`` is empirical down to the top
:data:`TAIL_SHARE` of the pooled scores and a power of ``1 - t`` beyond (similarities end at 1).
The mean of the queries' tails is the pooled tail, which is what a low FPIR depends on
(``FPIR ~ k * mean_q (1 - F_q(t))``); per-query shapes fitted to 100 scores each were much worse on
held-out dogs (docs/results.md).

The confidence that the best candidate is right (:class:`ConfidenceModel`) is fitted on the two
best individuals of galleries drawn the same way at each gallery size (the maxima of the genuine
score and ``k`` distractors, the tail beyond the query's own scores included). It uses the best
similarity ``s`` and its margin ``m`` over the second individual, and splits by Bayes' rule::

    P(right | s, m) = P(enrolled | s, m) * P(right | s, m, enrolled)
    logit P(enrolled | s, m) = log((1 - pi) / pi) + a0 + a1 s + a2 m

where ``pi`` is the share of queries of never-enrolled animals (strangers) and ``a`` a logistic
regression of enrolled against stranger queries weighted to even odds (so ``a0 + a1 s + a2 m`` is
the log likelihood ratio alone). The prior ``pi`` is therefore a setting of a deployment, not of the
model: the card records the share of the calibration (its default), and with ``pi = 0`` the
confidence is that of a gallery asked only about its own animals.

``P(right | s, m, enrolled)`` is a logistic regression of "the best individual is the query's own"
on the enrolled queries, per gallery size. The drawn galleries take a query's highest distractors
from the pooled tail, heavier than most queries' own, and so made a right best candidate too rare
for enrolled dogs (galleries of about 1,000 images of unseen dogs: 0.79-0.83 on average against
0.86-0.88 right). Hence, from :data:`MIN_CALIBRATION_INDIVIDUALS` validation individuals on, the
regression is fitted on the validation galleries themselves and each size adds only the change the
drawn galleries show from the validation galleries' own size to it (:class:`GalleryAnchor`): given
the best and second similarities, the gallery's size acts only through the chance that the query's
own individual is third or lower, which the draws do carry. With fewer, the real galleries are too
small to stand for larger ones (16 cows: far too sure at about 1,000 images) and the drawn galleries
alone are used, which err low (docs/results.md, "The confidence for a herd's own animals").

The older confidence (an isotonic regression of "right" on ``s`` alone, at the calibration's mix) is
still stored for cards read by older services. Everything is stored as plain numbers in the model
card, so the service interpolates tables and needs no fitted estimator object.

A service may also require a minimum confidence of a ``match`` (a best candidate past the threshold
but less likely right is ``uncertain``). That floor holds back some strangers too, so the threshold
alone would give a lower FPIR than its target, and withhold right matches for nothing. The table
therefore also holds thresholds for a grid of floors (:data:`MATCH_CONFIDENCE_FLOORS`), at the
calibration's share of strangers: a stranger whose best distractor scores ``x`` is answered
``match`` when the second individual's is at most ``x - m*(x)``, with ``m*(x)`` the smallest
margin at which the confidence reaches the floor, so its chance of a ``match`` is
``sum over x >= t of P(best in dx) * (F(x - m*(x)) / F(x)) ** (k - 1)``
(:func:`floored_match_chance`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from training.data import enrol_query_split
from training.metrics import open_set_auroc

GALLERY_SIZES = (10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
"""Gallery sizes (enrolled images) of the calibration table."""
TARGET_FPIRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
"""False-positive identification rates the table holds a threshold for."""
CONFIDENCE_GRID = tuple(round(-0.2 + 0.025 * i, 3) for i in range(49))
"""Similarities at which the confidence curve is stored (-0.2 ... 1.0)."""
MIN_INDIVIDUALS = 3
"""Fewest individuals a calibration can use: one stranger and two enrolled (one own, one other)."""
MIN_CALIBRATION_INDIVIDUALS = 30
"""Fewest validation individuals a calibration is trusted on: the card and the report warn below it
(its false-accept rate rests on too few impostor identities), and below it the confidence's chance of
a right best is fitted on the drawn galleries alone, not set against the validation galleries."""
BOOTSTRAP_LEVEL = 0.9
"""Thresholds are this quantile over bootstrap resamples of the validation strangers."""
BOOTSTRAP_RESAMPLES = 200
THRESHOLD_GRID = np.round(np.arange(-0.2, 1.0005, 0.001), 3)
"""Candidate thresholds (cosine similarity) the rates are evaluated at."""
TAIL_LEVEL_SHARE = 0.1
"""Above the pooled distractor scores' top share this large, every query's tail has the pooled shape."""
TAIL_SHARE = 0.003
"""The pooled distractor scores' top share the power tail is fitted to. On dogs held out from the
calibration it kept the measured FPIR nearest its target (1% share: 0.5-0.7 times a 1% target;
0.1%: 1.3-1.6 times)."""
MIN_TAIL_SCORES = 50
"""Fewest pooled scores the power tail is fitted to (a small validation set fits to more than its
top :data:`TAIL_SHARE`)."""
MIN_POOLED_SCORES = 500
"""Fewer pooled distractor scores than this fit no tail: the rates are the empirical ones."""
CONFIDENCE_DRAWS = 4
"""Galleries drawn per validation query at each gallery size for the confidence's fit."""
EXPONENT_SHARES = (2e-3, 1e-3, 5e-4, 2e-4)
"""Shares of the single-photo distractor scores above the thresholds the image exponent is measured
at: the highest ones the validation data still counts (on 111 validation dogs the exponent rose from
0.53 at a 1% share to 0.79 at 0.03%; a threshold for a 1% FPIR sits further out still)."""
MAX_EXPONENT_IMAGES = 8
"""Largest number of enrolled photos per individual the image exponent is measured up to."""
MAX_EXPONENT_QUERIES = 2000
"""Query photos (drawn at random) the image exponent is measured with, to bound its memory."""
MATCH_CONFIDENCE_FLOORS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Minimum match confidences the table holds thresholds for; a floor between two reads the lower
one's (a higher threshold: the target FPIR is kept, a little strictly)."""
REPORTED_FLOOR = 0.5
"""The floor whose thresholds the report and ``animalid calibrate`` print: the service's default
minimum match confidence (a test keeps the two equal; the service's settings do not import this
package, which would load torch for every command)."""
MARGIN_STEPS = 200
"""Margins over the second individual (0 to the confidence model's largest) a floor is solved on."""
LOGISTIC_RIDGE = 1e-3
"""L2 penalty on the logistic slopes, in units of one query's weight: it keeps the fit finite when a
small validation set separates perfectly, and is negligible against thousands of drawn queries."""


@dataclass(frozen=True)
class QueryScores:
    """Per query: its genuine score (nan for a stranger) and sorted distractor scores."""

    genuine: np.ndarray  # (Q,) float64, nan for strangers
    distractors: list[np.ndarray]  # Q sorted float64 arrays
    top2: np.ndarray  # (Q, 2) the two best individual scores in the whole validation gallery
    top1_correct: np.ndarray  # (Q,) bool: the best individual is the query's own
    images_per_individual: float  # enrolled images per enrolled individual (mean over repeats)
    individual: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))  # (Q,) whose photo

    @property
    def is_stranger(self) -> np.ndarray:
        return np.isnan(self.genuine)

    @cached_property
    def tail(self) -> DistractorTail | None:
        """The pooled tail of every query's distractor scores (None when too few to fit one)."""
        return DistractorTail.fit(self.distractors)


def below(sorted_scores: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Share of ``sorted_scores`` strictly below each value of ``t``."""
    if sorted_scores.size == 0:
        return np.ones(np.shape(t))
    return np.searchsorted(sorted_scores, t, side="left") / sorted_scores.size


@dataclass(frozen=True)
class DistractorTail:
    """Survival ``S(t)`` of the pooled distractor scores: empirical down to the top ``start_share``
    (scores above ``start``), then ``start_share * ((1 - t) / (1 - start)) ** power``.

    The power tail is the bounded one of extreme-value theory with its end point known (a cosine
    similarity ends at 1): one parameter, fitted by maximum likelihood (``-log(1 - t)`` is then
    exponential above ``start``), so it extrapolates with less noise than a generalized Pareto tail
    whose end point is fitted too.
    """

    pooled: np.ndarray  # every query's distractor scores, sorted
    level: float  # above it, a query's tail is its own share above it times the pooled shape
    start: float
    start_share: float
    power: float

    @classmethod
    def fit(cls, distractors: Sequence[np.ndarray]) -> DistractorTail | None:
        pooled = np.sort(np.concatenate([np.asarray(d, np.float64) for d in distractors] or [np.zeros(0)]))
        n = pooled.size
        if n < MIN_POOLED_SCORES:
            return None
        top = max(round(n * TAIL_SHARE), MIN_TAIL_SCORES)
        start = float(pooled[n - top - 1])
        log_gap = np.log(gap_to_one(np.array([start]))) - np.log(gap_to_one(pooled[n - top :]))
        return cls(
            pooled=pooled,
            level=float(pooled[math.floor(n * (1 - TAIL_LEVEL_SHARE))]),
            start=start,
            start_share=top / n,
            power=1.0 / max(float(log_gap.mean()), 1e-9),
        )

    def survival(self, t: np.ndarray) -> np.ndarray:
        """Share of pooled distractor scores at or above each ``t`` (the power tail above ``start``)."""
        t = np.asarray(t, dtype=np.float64)
        empirical = 1.0 - below(self.pooled, t)
        power = self.start_share * (gap_to_one(t) / gap_to_one(np.array(self.start))) ** self.power
        return np.where(t > self.start, power, empirical)

    def beyond_level(self, t: np.ndarray) -> np.ndarray:
        """``S(t) / S(level)``: how the share above the level thins out at each ``t``."""
        return self.survival(t) / self.survival(np.array(self.level))

    def quantile(self, share: float) -> float:
        """A score whose survival is ``share`` (the inverse of :meth:`survival`)."""
        if share < self.start_share:
            return 1.0 - (1.0 - self.start) * (share / self.start_share) ** (1.0 / self.power)
        n = self.pooled.size
        return float(self.pooled[n - min(max(math.ceil(share * n), 1), n)])

    def to_dict(self) -> dict[str, float]:
        return {
            "level": round(self.level, 4),
            "start": round(self.start, 4),
            "start_share": round(self.start_share, 6),
            "power": round(self.power, 3),
            "pooled_scores": self.pooled.size,
        }


def gap_to_one(t: np.ndarray) -> np.ndarray:
    """``1 - t``, kept above zero (a similarity of 1 would put the tail's logarithm at infinity)."""
    return np.maximum(1.0 - np.asarray(t, dtype=np.float64), 1e-6)


def distractor_cdf(
    sorted_scores: np.ndarray, t: np.ndarray, tail: DistractorTail | None, shape: np.ndarray | None = None
) -> np.ndarray:
    """``F_q(t)``: the query's empirical share of distractor scores below ``t``, and above the tail's
    level ``1 - (own share above the level) * S(t) / S(level)``, so it keeps rising past the query's
    highest score (see the module docstring). ``shape``: the tail's :meth:`DistractorTail.beyond_level`
    at these ``t`` when already computed (it is every query's)."""
    empirical = below(sorted_scores, t)
    if tail is None or sorted_scores.size == 0:
        return empirical
    own = 1.0 - float(below(sorted_scores, np.array([tail.level]))[0])
    if shape is None:
        shape = tail.beyond_level(t)
    return np.where(np.asarray(t) >= tail.level, 1.0 - own * shape, empirical)


def stranger_cdfs(scores: QueryScores, t: np.ndarray) -> np.ndarray:
    """(strangers, points): ``F_q`` of every stranger query at ``t``."""
    t = np.asarray(t, dtype=np.float64)
    tail = scores.tail
    shape = None if tail is None else tail.beyond_level(t)
    rows = [
        distractor_cdf(d, t, tail, shape)
        for g, d in zip(scores.genuine, scores.distractors, strict=True)
        if math.isnan(g)
    ]
    return np.array(rows) if rows else np.zeros((0, t.size))


def stranger_match_chance(
    scores: QueryScores, thresholds: np.ndarray, gallery_individuals: float, cdf: np.ndarray | None = None
) -> np.ndarray:
    """(strangers, thresholds): each stranger query's chance of a ``match`` answer. ``cdf``:
    :func:`stranger_cdfs` at ``thresholds`` when already computed."""
    cdf = stranger_cdfs(scores, thresholds) if cdf is None else cdf
    return 1.0 - cdf ** max(float(gallery_individuals), 1.0)


def floored_match_chance(
    scores: QueryScores,
    thresholds: np.ndarray,
    gallery_individuals: float,
    margins: np.ndarray,
    cdf: np.ndarray | None = None,
) -> np.ndarray:
    """(strangers, thresholds): each stranger query's chance of a ``match`` answer when a match also
    needs its best score ``x`` to lead the second individual's by ``margins`` (at each of
    ``thresholds`` taken as ``x``; inf: no margin is enough). The best of ``k`` distractors falls in
    ``[t_i, t_i+1)`` with chance ``F(t_i+1) ** k - F(t_i) ** k``, and the ``k - 1`` others all score
    at most ``x - m`` with chance ``(F(x - m) / F(x)) ** (k - 1)``. With every margin 0 this is
    :func:`stranger_match_chance`. ``cdf``: :func:`stranger_cdfs` at ``thresholds`` when already
    computed (it depends on neither the gallery nor the margins)."""
    k = max(float(gallery_individuals), 1.0)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    reachable = np.isfinite(margins)
    cdf = stranger_cdfs(scores, thresholds) if cdf is None else cdf
    shifted = stranger_cdfs(scores, thresholds - np.where(reachable, margins, 0.0))
    best_in_bin = np.diff(np.concatenate([cdf**k, np.ones((len(cdf), 1))], axis=1), axis=1)
    others_below = np.clip(shifted / np.maximum(cdf, 1e-300), 0.0, 1.0) ** (k - 1.0)
    accepted = np.where(margins <= 0.0, 1.0, np.where(reachable, others_below, 0.0))
    return np.cumsum((best_in_bin * accepted)[:, ::-1], axis=1)[:, ::-1]


def identification_rates(
    scores: QueryScores, thresholds: np.ndarray, gallery_individuals: float, chance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(FPIR, TPIR) at each threshold for galleries of ``gallery_individuals`` individuals.
    ``chance``: :func:`stranger_match_chance` at ``thresholds`` for that gallery when already computed."""
    k = max(float(gallery_individuals), 1.0)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    tpir = np.zeros(thresholds.shape)
    n_known = int((~scores.is_stranger).sum())
    for g, d in zip(scores.genuine, scores.distractors, strict=True):
        if not math.isnan(g):
            # the own individual is in the gallery; k - 1 distractors must all score below it
            tpir += (g >= thresholds) * float(distractor_cdf(d, np.array([g]), scores.tail)[0] ** (k - 1.0))
    chance = stranger_match_chance(scores, thresholds, k) if chance is None else chance
    fpir = chance.mean(axis=0) if len(chance) else np.zeros(thresholds.shape)
    return fpir, tpir / max(n_known, 1)


def bootstrap_weights(individuals: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, queries) weights: each resample draws the queries' individuals with replacement
    and weighs every query by how often its individual was drawn."""
    names, index = np.unique(individuals, return_inverse=True)
    draws = rng.integers(0, len(names), size=(resamples, len(names)))
    counts = np.stack([np.bincount(row, minlength=len(names)) for row in draws])
    return counts[:, index].astype(np.float64)


def conservative_thresholds(
    thresholds: np.ndarray, chance: np.ndarray, weights: np.ndarray, targets: Sequence[float], level: float
) -> list[float]:
    """For each of ``targets``, the ``level`` quantile over bootstrap resamples of the strangers
    (``weights``) of the threshold that meets it: a small validation set's luck is not taken as the
    truth."""
    fpir = (weights @ chance) / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    return [
        float(np.quantile([threshold_for_fpir(thresholds, row, t) for row in fpir], level, method="higher"))
        for t in targets
    ]


def threshold_for_fpir(thresholds: np.ndarray, fpir: np.ndarray, target: float) -> float:
    """The smallest threshold whose FPIR is at most ``target`` (FPIR falls as the threshold rises)."""
    ok = np.flatnonzero(fpir <= target)
    return float(thresholds[ok[0]]) if ok.size else float(thresholds[-1])


def isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators).

    Returns (block x means, block y means): the fit as a step curve whose knots can be linearly
    interpolated.
    """
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    # blocks: [sum_y, sum_x, count]
    sums_y: list[float] = []
    sums_x: list[float] = []
    counts: list[int] = []
    for xv, yv in zip(xs, ys, strict=True):
        sums_y.append(float(yv))
        sums_x.append(float(xv))
        counts.append(1)
        while len(counts) > 1 and sums_y[-2] / counts[-2] > sums_y[-1] / counts[-1]:
            # pop first: ``a[-2] += a.pop()`` would add to the wrong element
            y_last, x_last, n_last = sums_y.pop(), sums_x.pop(), counts.pop()
            sums_y[-1] += y_last
            sums_x[-1] += x_last
            counts[-1] += n_last
    c = np.array(counts, dtype=np.float64)
    return np.array(sums_x) / c, np.array(sums_y) / c


def logistic_regression(features: np.ndarray, y: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted logistic regression by Newton's method: coefficients ``b`` of ``P(y) = 1 / (1 +
    exp(-features @ b))``, the first column of ``features`` being the intercept's (not penalised;
    the slopes carry :data:`LOGISTIC_RIDGE`). A weight counts as that many repeats of its row."""
    x = np.asarray(features, np.float64)
    w = np.asarray(weight, np.float64)
    penalty = np.full(x.shape[1], LOGISTIC_RIDGE)
    penalty[0] = 0.0
    b = np.zeros(x.shape[1])
    for _ in range(100):
        p = sigmoid(x @ b)
        gradient = x.T @ (w * (p - y)) + penalty * b
        hessian = (x * (w * p * (1.0 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        b -= step
        if np.abs(step).max() < 1e-9:
            break
    return b


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500.0, 500.0)))


def confidence_features(best: np.ndarray, second: np.ndarray, max_margin: float) -> np.ndarray:
    """(queries, 3): intercept, best similarity, its margin over the second individual (at most
    ``max_margin``; no second individual: ``max_margin``)."""
    best = np.asarray(best, np.float64)
    margin = np.minimum(best - np.asarray(second, np.float64), max_margin)
    return np.column_stack([np.ones(best.shape), best, np.nan_to_num(margin, nan=max_margin)])


Top2 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Per query: the best similarity, the second individual's (-inf: none), whether the best is the
query's own individual, and whether the query is a stranger."""


@dataclass(frozen=True)
class GalleryAnchor:
    """The validation galleries themselves, against which the drawn galleries' chance of a right
    best is set: their queries' :class:`Top2`, and that of galleries drawn at their own size."""

    real: Top2
    drawn: Top2


def right_regression(
    best: np.ndarray, second: np.ndarray, right: np.ndarray, stranger: np.ndarray, max_margin: float
) -> np.ndarray:
    """Log odds that the best is right, of the enrolled queries with a best individual."""
    keep = np.isfinite(best) & ~stranger
    x = confidence_features(best[keep], second[keep], max_margin)
    return logistic_regression(x, right[keep].astype(np.float64), np.ones(keep.sum()))


@dataclass(frozen=True)
class ConfidenceModel:
    """The chance that the best candidate is right, per gallery size of the table it belongs to
    (see the module docstring): two logistic regressions on (1, best similarity, margin)."""

    enrolled_logit: list[list[float]]  # [gallery size][3]: log likelihood ratio enrolled : stranger
    right_logit: list[list[float]]  # [gallery size][3]: log odds the best is right, enrolled queries
    stranger_share: float  # share of stranger queries the calibration drew: the default prior
    max_margin: float  # the largest margin fitted on; larger ones are taken as this
    # right_logit set against the validation galleries themselves (:class:`GalleryAnchor`); False:
    # fitted on the drawn galleries alone (fewer validation individuals, or a card from before it)
    anchored: bool = False

    @classmethod
    def fit(cls, draws: Sequence[Top2], anchor: GalleryAnchor | None = None) -> ConfidenceModel:
        """``draws``: (best, second, right, stranger) of the galleries drawn at each gallery size
        (:func:`sampled_top2`). Without ``anchor`` the chance that the best is right is fitted on the
        drawn galleries alone, size by size; with it, on the validation galleries themselves, plus
        the change the drawn galleries show from the validation galleries' own size to each size
        (module docstring)."""
        margins = [(b - s)[np.isfinite(b) & np.isfinite(s)] for b, s, _, _ in draws]
        if anchor is not None:
            margins.append(anchor.real[0] - anchor.real[1])  # a second of -inf: inf, dropped below
        max_margin = max(float(m[np.isfinite(m)].max(initial=0.0)) for m in margins)
        enrolled_rows: list[list[float]] = []
        for best, second, _, stranger in draws:
            keep = np.isfinite(best)
            x = confidence_features(best[keep], second[keep], max_margin)
            strange = stranger[keep]
            # each class weighs half: the intercept is that of the likelihood ratio alone
            even = np.where(strange, 0.5 / max(strange.mean(), 1e-12), 0.5 / max((~strange).mean(), 1e-12))
            enrolled_rows.append(logistic_regression(x, (~strange).astype(np.float64), even).tolist())
        right_rows = [right_regression(*draw, max_margin) for draw in draws]
        if anchor is not None:
            shift = right_regression(*anchor.real, max_margin) - right_regression(*anchor.drawn, max_margin)
            right_rows = [row + shift for row in right_rows]
        stranger_share = float(np.mean(np.concatenate([s for _, _, _, s in draws])))
        return cls(
            enrolled_rows,
            [row.tolist() for row in right_rows],
            stranger_share,
            max_margin,
            anchor is not None,
        )

    def probability(self, row: int, similarity: float, second: float | None, stranger_share: float) -> float:
        """At gallery-size row ``row``; ``second`` None: no second individual in the gallery."""
        seconds = np.array([-np.inf if second is None else second])
        return float(self.probabilities(row, np.array([similarity]), seconds, stranger_share)[0])

    def probabilities(
        self, row: int, best: np.ndarray, second: np.ndarray, stranger_share: float
    ) -> np.ndarray:
        """:meth:`probability` of many (best, second) pairs; a second of -inf: none."""
        x = confidence_features(best, second, self.max_margin)
        right = sigmoid(x @ np.asarray(self.right_logit[row]))
        if stranger_share <= 0.0:
            return right
        prior = math.log((1.0 - stranger_share) / stranger_share)
        return sigmoid(x @ np.asarray(self.enrolled_logit[row]) + prior) * right

    def floor_margins(
        self, row: int, similarities: np.ndarray, floor: float, stranger_share: float
    ) -> np.ndarray:
        """For each best similarity, the smallest margin over the second individual at which the
        confidence reaches ``floor`` (inf where even the largest margin does not). Margins above it
        are taken to reach it too (the confidence grows with the margin), which errs toward counting
        more strangers as matches: a stricter threshold."""
        margins = np.linspace(0.0, self.max_margin, MARGIN_STEPS + 1)
        best = np.repeat(np.asarray(similarities, np.float64), margins.size)
        second = best - np.tile(margins, len(similarities))
        enough = (self.probabilities(row, best, second, stranger_share) >= floor).reshape(-1, margins.size)
        return np.where(enough.any(axis=1), margins[enough.argmax(axis=1)], np.inf)

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": ["intercept", "similarity", "margin"],
            "enrolled_logit": [[round(v, 5) for v in row] for row in self.enrolled_logit],
            "right_logit": [[round(v, 5) for v in row] for row in self.right_logit],
            "stranger_share": round(self.stranger_share, 4),
            "max_margin": round(self.max_margin, 4),
            "anchored": self.anchored,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], rows: int) -> ConfidenceModel:
        model = cls(
            enrolled_logit=[[float(v) for v in row] for row in data["enrolled_logit"]],
            right_logit=[[float(v) for v in row] for row in data["right_logit"]],
            stranger_share=float(data["stranger_share"]),
            max_margin=float(data["max_margin"]),
            anchored=bool(data.get("anchored", False)),
        )
        table = model.enrolled_logit + model.right_logit
        if (
            len(model.enrolled_logit) != rows
            or len(model.right_logit) != rows
            or any(len(r) != 3 for r in table)
        ):
            raise ValueError("open_set confidence_model: one row of three coefficients per gallery size")
        if not 0.0 <= model.stranger_share < 1.0:
            raise ValueError(
                f"open_set confidence_model: stranger_share {model.stranger_share} not in [0, 1)"
            )
        return model


@dataclass
class OpenSetCalibration:
    """What the model card stores: thresholds and TPIR per (gallery size, target FPIR), the
    confidence curve per gallery size, and how the scores separate strangers."""

    gallery_sizes: list[int]
    target_fpirs: list[float]
    thresholds: list[list[float]]  # [gallery size][target fpir]
    tpir: list[list[float]]
    confidence_similarity: list[float]
    confidence: list[list[float]]  # [gallery size][similarity]: P(best candidate is right)
    images_per_individual: float
    separation: dict[str, float] = field(default_factory=dict)  # AUROC of similarity and of margin
    # Largest gallery (images) the validation data holds distinct individuals for; beyond it the
    # table is an extrapolation (the strangers' highest distractor scores are all it has seen).
    simulated_up_to: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    # The fitted tail of the distractor scores that larger galleries are extrapolated with (empty: the
    # table was computed without one, so beyond simulated_up_to it only reuses the highest scores seen).
    tail: dict[str, float] = field(default_factory=dict)
    # The confidence from similarity, margin and a prior share of strangers (None: a card from before
    # it, whose confidence is the curve on similarity alone).
    confidence_model: ConfidenceModel | None = None
    # How a distractor's chance of a high score grows with its enrolled images (:func:`image_exponent`):
    # 1 reads a gallery by its images alone (cards from before it), 0 by its individuals alone.
    image_exponent: float = 1.0
    # Thresholds [gallery size][target fpir] for a match that also needs a confidence of at least each
    # floor, at the confidence model's share of strangers (empty: a card from before them).
    floor_thresholds: dict[float, list[list[float]]] = field(default_factory=dict)
    # Not stored in the card: the curves the report plots.
    curves: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return (
            {
                "gallery_sizes": list(self.gallery_sizes),
                "target_fpirs": list(self.target_fpirs),
                "thresholds": [[round(v, 4) for v in row] for row in self.thresholds],
                "tpir": [[round(v, 4) for v in row] for row in self.tpir],
                "confidence_similarity": list(self.confidence_similarity),
                "confidence": [[round(v, 4) for v in row] for row in self.confidence],
                "images_per_individual": round(self.images_per_individual, 3),
                "separation": {k: round(v, 4) for k, v in self.separation.items()},
                "simulated_up_to": self.simulated_up_to,
                "counts": dict(self.counts),
                "tail": dict(self.tail),
                "image_exponent": round(self.image_exponent, 4),
            }
            | ({"confidence_model": self.confidence_model.to_dict()} if self.confidence_model else {})
            | (
                {
                    "match_confidence_floors": {
                        "floors": sorted(self.floor_thresholds),
                        "thresholds": [
                            [[round(v, 4) for v in row] for row in self.floor_thresholds[f]]
                            for f in sorted(self.floor_thresholds)
                        ],
                    }
                }
                if self.floor_thresholds
                else {}
            )
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpenSetCalibration:
        sizes = [int(v) for v in data["gallery_sizes"]]
        fpirs = [float(v) for v in data["target_fpirs"]]
        grid = [float(v) for v in data["confidence_similarity"]]
        table = cls(
            gallery_sizes=sizes,
            target_fpirs=fpirs,
            thresholds=[[float(v) for v in row] for row in data["thresholds"]],
            tpir=[[float(v) for v in row] for row in data["tpir"]],
            confidence_similarity=grid,
            confidence=[[float(v) for v in row] for row in data["confidence"]],
            images_per_individual=float(data["images_per_individual"]),
            separation={str(k): float(v) for k, v in dict(data.get("separation") or {}).items()},
            simulated_up_to=int(data.get("simulated_up_to") or 0),
            counts={str(k): int(v) for k, v in dict(data.get("counts") or {}).items()},
            tail={str(k): float(v) for k, v in dict(data.get("tail") or {}).items()},
            image_exponent=float(data.get("image_exponent", 1.0)),
        )
        if data.get("confidence_model") is not None:
            table.confidence_model = ConfidenceModel.from_dict(data["confidence_model"], len(sizes))
        floors = data.get("match_confidence_floors")
        if floors is not None:
            if table.confidence_model is None:
                raise ValueError("open_set match_confidence_floors: the table has no confidence model")
            if len(floors["floors"]) != len(floors["thresholds"]):
                raise ValueError("open_set match_confidence_floors: one threshold table per floor")
            table.floor_thresholds = {
                float(f): [[float(v) for v in row] for row in rows]
                for f, rows in zip(floors["floors"], floors["thresholds"], strict=True)
            }
        shapes_ok = (
            len(sizes) > 0
            and sizes == sorted(sizes)
            and fpirs == sorted(fpirs)
            and len(table.thresholds) == len(sizes) == len(table.tpir) == len(table.confidence)
            and all(len(r) == len(fpirs) for r in table.thresholds + table.tpir)
            and all(len(rows) == len(sizes) for rows in table.floor_thresholds.values())
            and all(len(r) == len(fpirs) for rows in table.floor_thresholds.values() for r in rows)
            and all(len(r) == len(grid) for r in table.confidence)
        )
        if not shapes_ok:
            raise ValueError("open_set table: rows and columns do not match its gallery sizes and FPIRs")
        if not 0.0 <= table.image_exponent <= 1.0:
            raise ValueError(f"open_set image_exponent {table.image_exponent} not in [0, 1]")
        if not all(0.0 < f < 1.0 for f in table.floor_thresholds):
            raise ValueError("open_set match_confidence_floors: every floor in (0, 1)")
        return table

    def equivalent_size(self, image_counts: Mapping[int, int]) -> int:
        """The gallery as the table reads it: images of individuals with the calibration's
        :attr:`images_per_individual` each. ``image_counts`` maps images per individual to the
        number of individuals with that many; an individual of ``n`` images counts as ``(n / m) **
        image_exponent`` individuals of ``m``. With an exponent of 1 this is the gallery's images."""
        m = self.images_per_individual
        return round(sum(k * m * (n / m) ** self.image_exponent for n, k in image_counts.items() if n > 0))

    def _size_weights(self, gallery_size: int) -> tuple[int, int, float]:
        """Rows bracketing ``gallery_size`` and the weight of the upper one (linear in log size)."""
        sizes = np.log(np.asarray(self.gallery_sizes, dtype=np.float64))
        x = math.log(max(gallery_size, 1))
        if x <= sizes[0]:
            return 0, 0, 0.0
        if x >= sizes[-1]:
            last = len(sizes) - 1
            return last, last, 0.0
        hi = int(np.searchsorted(sizes, x))
        lo = hi - 1
        return lo, hi, float((x - sizes[lo]) / (sizes[hi] - sizes[lo]))

    def _row(self, table: list[list[float]], gallery_size: int) -> np.ndarray:
        lo, hi, w = self._size_weights(gallery_size)
        return (1 - w) * np.asarray(table[lo]) + w * np.asarray(table[hi])

    def floor_for(self, min_confidence: float | None, stranger_share: float | None = None) -> float:
        """The stored floor whose thresholds a match needing ``min_confidence`` is decided with: the
        highest not above it; 0 (the thresholds alone) when none is, and when the confidence is
        asked for a smaller share of strangers than the calibration's (``stranger_share``; None: the
        calibration's), since it is then higher and holds back fewer strangers than those
        thresholds count on."""
        if not min_confidence or self.confidence_model is None:
            return 0.0
        if stranger_share is not None and stranger_share < self.confidence_model.stranger_share - 1e-4:
            return 0.0
        return max((f for f in self.floor_thresholds if f <= min_confidence + 1e-9), default=0.0)

    def threshold(
        self,
        gallery_size: int,
        target_fpir: float,
        min_confidence: float | None = None,
        stranger_share: float | None = None,
    ) -> float:
        """Threshold for ``target_fpir`` at ``gallery_size`` images: linear in log gallery size
        and in log FPIR between the stored points, clamped to the table's range. With
        ``min_confidence``, the threshold at which strangers past it *and* that confident are the
        target's share (:meth:`floor_for` says which stored floor is read)."""
        floor = self.floor_for(min_confidence, stranger_share)
        row = self._row(self.floor_thresholds[floor] if floor else self.thresholds, gallery_size)
        return float(np.interp(math.log(target_fpir), np.log(self.target_fpirs), row))

    def expected_tpir(self, gallery_size: int, target_fpir: float) -> float:
        row = self._row(self.tpir, gallery_size)
        return float(np.interp(math.log(target_fpir), np.log(self.target_fpirs), row))

    @property
    def stranger_share(self) -> float:
        """The share of stranger queries the confidence was fitted for (its default prior)."""
        if self.confidence_model is not None:
            return self.confidence_model.stranger_share
        total = self.counts.get("stranger_queries", 0) + self.counts.get("enrolled_queries", 0)
        return self.counts.get("stranger_queries", 0) / total if total else 0.0

    def probability(
        self,
        similarity: float,
        gallery_size: int,
        second: float | None = None,
        stranger_share: float | None = None,
    ) -> float:
        """Calibrated probability that the best candidate is the right animal, from its similarity,
        the second individual's (None: there is none) and the share of queries that are of animals
        not enrolled (None: the calibration's). A card without the confidence model (older ones)
        answers from its curve on the similarity alone, at the calibration's share."""
        model = self.confidence_model
        if model is None:
            row = self._row(self.confidence, gallery_size)
            return float(np.clip(np.interp(similarity, self.confidence_similarity, row), 0.0, 1.0))
        share = model.stranger_share if stranger_share is None else stranger_share
        lo, hi, w = self._size_weights(gallery_size)
        low = model.probability(lo, similarity, second, share)
        high = model.probability(hi, similarity, second, share)
        return float(np.clip((1 - w) * low + w * high, 0.0, 1.0))


def image_exponent(emb: np.ndarray, individuals: Sequence[str], seed: int = 0) -> float:
    """``a`` of ``p_m(t) ~ m ** a``: how a distractor individual's chance that one of its ``m``
    enrolled photos reaches a high similarity ``t`` grows with ``m``.

    ``a = 1`` when its photos are as unlike one another as photos of different animals (a gallery is
    then described by its images alone), ``0`` when they are copies of one photo (by its individuals
    alone). Measured on the validation individuals with at least ``M`` photos (``M`` the median count,
    at most :data:`MAX_EXPONENT_IMAGES`): for every other photo as a query, the exact chance that a
    random ``m`` of the individual's photos hold one scoring ``t`` or more (hypergeometric), pooled,
    and ``log p_m`` against ``log m`` at the thresholds of :data:`EXPONENT_SHARES`. Photos of one
    session (a video clip) are as alike in a gallery as here, so they lower ``a`` too. Returns 1 (read
    by images, as before the exponent) when the data cannot show it: fewer than 2 photos per
    individual, or no high score at all.
    """
    labels = np.asarray(individuals)
    _, index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    most = min(MAX_EXPONENT_IMAGES, int(np.quantile(counts, 0.5, method="lower")))
    eligible = np.flatnonzero(counts >= most)
    if most < 2 or len(eligible) < 2:
        return 1.0
    emb = np.asarray(emb, dtype=np.float32)
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.permutation(len(labels))[:MAX_EXPONENT_QUERIES])
    blocks = [
        emb[queries[index[queries] != j]] @ emb[index == j].T  # (queries of other animals, photos of j)
        for j in eligible
    ]
    pooled = np.concatenate([block.ravel() for block in blocks])
    thresholds = np.quantile(pooled, 1.0 - np.asarray(EXPONENT_SHARES))
    sizes = np.arange(1, most + 1)
    hits = np.zeros((most, len(thresholds)))
    for block in blocks:
        n = block.shape[1]
        above = (block[:, :, None] >= thresholds).sum(axis=1)  # (queries, thresholds)
        missed = np.ones(above.shape)
        for m in sizes:  # P(none of a random m photos is above) = prod_i (n - above - i) / (n - i)
            missed = missed * np.clip(n - above - (m - 1), 0, None) / (n - (m - 1))
            hits[m - 1] += (1.0 - missed).sum(axis=0)
    seen = np.flatnonzero((hits > 0).all(axis=0))
    if not seen.size:
        return 1.0
    slopes = [np.polyfit(np.log(sizes), np.log(hits[:, t]), 1)[0] for t in seen]
    return float(np.clip(np.mean(slopes), 0.0, 1.0))


def query_scores(
    emb: np.ndarray,
    individuals: Sequence[str],
    groups: Sequence[str],
    seed: int,
    repeats: int,
    stranger_fraction: float = 0.25,
) -> QueryScores:
    """Genuine and per-individual distractor scores of every query over ``repeats`` seeded splits."""
    emb = np.asarray(emb, dtype=np.float32)
    labels = np.asarray(individuals)
    group_of = np.asarray(groups)
    names = sorted(set(labels.tolist()))
    if len(names) < MIN_INDIVIDUALS:
        raise ValueError(
            f"open-set calibration needs at least {MIN_INDIVIDUALS} individuals, got {len(names)}"
        )
    genuine: list[float] = []
    distractors: list[np.ndarray] = []
    top2: list[tuple[float, float]] = []
    correct: list[bool] = []
    whose: list[str] = []
    per_individual: list[float] = []
    for r in range(repeats):
        rng = random.Random(f"{seed}:open-set:{r}")
        shuffled = names[:]
        rng.shuffle(shuffled)
        n_strangers = min(max(1, round(len(names) * stranger_fraction)), len(names) - 2)
        strangers = set(shuffled[:n_strangers])
        known_idx = np.flatnonzero([lab not in strangers for lab in labels])
        enrol_local, query_local = enrol_query_split(
            labels[known_idx].tolist(), group_of[known_idx].tolist(), rng
        )
        enrol = known_idx[enrol_local]
        stranger_idx = np.flatnonzero([lab in strangers for lab in labels])
        queries = np.concatenate([known_idx[query_local], stranger_idx])
        enrolled = sorted(set(labels[enrol].tolist()))
        per_individual.append(len(enrol) / len(enrolled))
        sim = emb[queries] @ emb[enrol].T  # (Q, E)
        # best image per enrolled individual
        by_ind = np.full((len(queries), len(enrolled)), -np.inf, dtype=np.float32)
        enrol_labels = labels[enrol]
        for j, name in enumerate(enrolled):
            by_ind[:, j] = sim[:, enrol_labels == name].max(axis=1)
        for row, qi in zip(by_ind, queries, strict=True):
            own = labels[qi]
            whose.append(str(own))
            mask = np.array([name != own for name in enrolled])
            genuine.append(float(row[~mask][0]) if (~mask).any() else math.nan)
            distractors.append(np.sort(row[mask].astype(np.float64)))
            order = np.argsort(-row)
            top2.append((float(row[order[0]]), float(row[order[1]])))
            correct.append(enrolled[order[0]] == own)
    return QueryScores(
        genuine=np.array(genuine),
        distractors=distractors,
        top2=np.array(top2),
        top1_correct=np.array(correct),
        images_per_individual=float(np.mean(per_individual)),
        individual=np.array(whose),
    )


def sampled_top2(
    scores: QueryScores, gallery_individuals: float, rng: np.random.Generator, draws: int = CONFIDENCE_DRAWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two best similarities, whether the best is the query's own individual, and whether the
    query is a stranger, for ``draws`` random galleries of ``gallery_individuals`` individuals per
    query. The best of ``n`` distractors is drawn by inverting ``F(t) ** n``, the second given it by
    inverting ``(F(t) / F(best)) ** (n - 1)`` (the tail beyond the query's own scores included);
    -inf where the gallery holds no such individual."""
    k = max(float(gallery_individuals), 1.0)
    best: list[float] = []
    second: list[float] = []
    right: list[bool] = []
    for g, d in zip(scores.genuine, scores.distractors, strict=True):
        kd = k if math.isnan(g) else k - 1.0
        for u1, u2 in rng.random((draws, 2)):
            p1 = u1 ** (1.0 / kd) if kd >= 1.0 else 0.0
            d1 = -math.inf if d.size == 0 or kd < 1.0 else max_quantile(d, p1, scores.tail)
            d2 = (
                -math.inf
                if d.size == 0 or kd < 2.0
                else max_quantile(d, p1 * u2 ** (1.0 / (kd - 1.0)), scores.tail)
            )
            top = sorted([d1, d2] if math.isnan(g) else [float(g), d1, d2], reverse=True)
            best.append(top[0])
            second.append(top[1])
            right.append(not math.isnan(g) and g >= d1)
    strangers = np.repeat(scores.is_stranger, draws)
    return np.array(best), np.array(second), np.array(right), strangers


def gallery_anchor(scores: QueryScores, rng: np.random.Generator) -> GalleryAnchor:
    """The validation galleries of ``scores`` and galleries drawn at their size (their individuals:
    an enrolled query's own and its distractors)."""
    known = ~scores.is_stranger
    own_size = float(np.mean([d.size for d, k in zip(scores.distractors, known, strict=True) if k])) + 1.0
    real = (scores.top2[:, 0], scores.top2[:, 1], scores.top1_correct, scores.is_stranger)
    return GalleryAnchor(real, sampled_top2(scores, own_size, rng))


def max_quantile(sorted_scores: np.ndarray, p: float, tail: DistractorTail | None) -> float:
    """The distractor score whose ``F_q`` is ``p`` (:func:`distractor_cdf` inverted)."""
    m = sorted_scores.size
    own = 0.0 if tail is None else 1.0 - float(below(sorted_scores, np.array([tail.level]))[0])
    if tail is not None and p > 1.0 - own:
        return tail.quantile((1.0 - p) / own * float(tail.survival(np.array(tail.level))))
    # P(score <= d[j]) = (j + 1) / m  ->  j = ceil(m * p) - 1
    return float(sorted_scores[min(max(math.ceil(m * p) - 1, 0), m - 1)])


def calibrate_open_set(
    emb: np.ndarray,
    individuals: Sequence[str],
    groups: Sequence[str],
    seed: int = 0,
    repeats: int = 5,
    stranger_fraction: float = 0.25,
    gallery_sizes: Sequence[int] = GALLERY_SIZES,
    target_fpirs: Sequence[float] = TARGET_FPIRS,
    level: float = BOOTSTRAP_LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    floors: Sequence[float] = MATCH_CONFIDENCE_FLOORS,
) -> OpenSetCalibration:
    """The open-set table of validation embeddings (see the module docstring).

    Each threshold is the ``level`` quantile over ``resamples`` bootstrap resamples of the stranger
    individuals (``level`` 0.5: about the plain estimate; higher: more conservative). ``floors``:
    the minimum match confidences the table also holds thresholds for.
    """
    scores = query_scores(emb, individuals, groups, seed, repeats, stranger_fraction)
    rng = np.random.default_rng(seed)
    weights = bootstrap_weights(scores.individual[scores.is_stranger], resamples, rng)
    thresholds: list[list[float]] = []
    tpir_rows: list[list[float]] = []
    confidence: list[list[float]] = []
    drawn = []
    curves = {}
    at_grid = stranger_cdfs(scores, THRESHOLD_GRID)
    for size in gallery_sizes:
        k = size / scores.images_per_individual
        chance = stranger_match_chance(scores, THRESHOLD_GRID, k, at_grid)
        fpir, tpir = identification_rates(scores, THRESHOLD_GRID, k, chance)
        curves[int(size)] = (THRESHOLD_GRID, fpir, 1.0 - tpir)
        row_t = conservative_thresholds(THRESHOLD_GRID, chance, weights, target_fpirs, level)
        thresholds.append(row_t)
        tpir_rows.append([float(np.interp(t, THRESHOLD_GRID, tpir)) for t in row_t])
        drawn.append(sampled_top2(scores, k, rng))
        top, _, right, _ = drawn[-1]
        finite = np.isfinite(top)
        xs, ys = isotonic(top[finite], right[finite].astype(np.float64))
        confidence.append(np.interp(CONFIDENCE_GRID, xs, ys).tolist())
    trusted = len(set(individuals)) >= MIN_CALIBRATION_INDIVIDUALS
    model = ConfidenceModel.fit(drawn, gallery_anchor(scores, rng) if trusted else None)
    floor_thresholds = {
        floor: [
            conservative_thresholds(
                THRESHOLD_GRID,
                floored_match_chance(
                    scores,
                    THRESHOLD_GRID,
                    size / scores.images_per_individual,
                    model.floor_margins(row, THRESHOLD_GRID, floor, model.stranger_share),
                    at_grid,
                ),
                weights,
                target_fpirs,
                level,
            )
            for row, size in enumerate(gallery_sizes)
        ]
        for floor in floors
    }
    stranger = scores.is_stranger
    known_right = ~stranger & scores.top1_correct
    margin = scores.top2[:, 0] - scores.top2[:, 1]
    separation = {
        "similarity_auroc": open_set_auroc(scores.top2[known_right, 0], scores.top2[stranger, 0]),
        "margin_auroc": open_set_auroc(margin[known_right], margin[stranger]),
    }
    return OpenSetCalibration(
        gallery_sizes=[int(s) for s in gallery_sizes],
        target_fpirs=[float(f) for f in target_fpirs],
        thresholds=thresholds,
        tpir=tpir_rows,
        confidence_similarity=list(CONFIDENCE_GRID),
        confidence=confidence,
        images_per_individual=scores.images_per_individual,
        separation=separation,
        simulated_up_to=round(
            scores.images_per_individual * float(np.mean([len(d) for d in scores.distractors]))
        ),
        counts={
            "individuals": len(set(np.asarray(individuals).tolist())),
            "images": len(individuals),
            "repeats": repeats,
            "stranger_queries": int(stranger.sum()),
            "enrolled_queries": int((~stranger).sum()),
        },
        tail=scores.tail.to_dict() if scores.tail is not None else {},
        confidence_model=model,
        image_exponent=image_exponent(emb, individuals, seed),
        floor_thresholds=floor_thresholds,
        curves=curves,
    )


HERD_TARGETS = (0.01, 0.05)
"""Target FPIRs a herd check reports."""
INTERVAL_DRAWS = 2000
"""Resamples of the individuals behind a measured rate's 95% interval."""
SIMILARITY_BLOCK = 1 << 24
"""Most query-by-gallery similarities a herd check holds at once (64 MB in float32)."""


def resampled_interval(hits: np.ndarray, draws: np.ndarray) -> tuple[float, float]:
    """95% interval of the share of ``hits`` when their individuals are drawn again with replacement
    (``draws``: :func:`bootstrap_weights` of the individuals): one individual's photos pass or fail
    together (a look-alike with most of them), so the photos are not independent trials."""
    rates = (draws @ hits) / np.maximum(draws.sum(axis=1), 1e-12)
    low, high = np.quantile(rates, [0.025, 0.975])
    return float(low), float(high)


@dataclass(frozen=True)
class HerdMates:
    """How a table's threshold for one target FPIR treats a gallery's own animals as strangers."""

    target: float
    threshold: float  # the table's, for this gallery
    past: float  # share of the left-out animals' photos whose best similarity reaches it
    interval: tuple[float, float]  # 95%, over the animals drawn again with replacement
    holding: float  # the threshold at which the target share of those photos reaches it

    @property
    def excess(self) -> float:
        """How far the table's threshold must rise to hold the target on this herd (0: it holds)."""
        return max(0.0, self.holding - self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_fpir": self.target,
            "threshold": self.threshold,
            "herd_mates_past": self.past,
            "interval_95": list(self.interval),
            "threshold_holding_target": self.holding,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HerdMates:
        low, high = data["interval_95"]
        return cls(
            target=float(data["target_fpir"]),
            threshold=float(data["threshold"]),
            past=float(data["herd_mates_past"]),
            interval=(float(low), float(high)),
            holding=float(data["threshold_holding_target"]),
        )


@dataclass(frozen=True)
class HerdCalibration:
    """A herd check kept in the card of the model it ran with (`animalid gallery check --apply`, or
    the worker's ``herd_check`` job). Where a deployment's own animals, each left out in turn, reach
    the table's threshold for a target FPIR more often than the target, the service raises that
    threshold by the row's :attr:`HerdMates.excess` at every gallery size: the herd is that much
    more alike than the validation animals the table was calibrated on. Never lowers a threshold:
    enrolment photos asked against the rest are not queries, and the table was calibrated on them."""

    checked_at: str  # ISO 8601, UTC
    images: int  # stored vectors of the gallery checked
    individuals: int
    size: int  # that gallery as the table reads it
    rows: tuple[HerdMates, ...]

    def row_for(self, target: float) -> HerdMates | None:
        """The row of ``target`` (None when the check did not report it)."""
        return next((row for row in self.rows if math.isclose(row.target, target)), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at,
            "images": self.images,
            "individuals": self.individuals,
            "size_read": self.size,
            "targets": [row.to_dict() for row in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HerdCalibration:
        return cls(
            checked_at=str(data["checked_at"]),
            images=int(data["images"]),
            individuals=int(data["individuals"]),
            size=int(data["size_read"]),
            rows=tuple(HerdMates.from_dict(row) for row in data["targets"]),
        )


def herd_mates(
    emb: np.ndarray,
    individuals: Sequence[str],
    table: OpenSetCalibration,
    targets: Sequence[float] = HERD_TARGETS,
    max_queries: int = 5000,
    seed: int = 0,
) -> tuple[int, list[HerdMates]]:
    """Each animal of a gallery (``emb``: unit vectors of its photos, of ``individuals``) left out in
    turn and its photos asked against the rest, as a never-enrolled herd-mate would be asked: for each
    target FPIR, the share of them at or past ``table``'s threshold for this gallery, and the threshold
    that would hold the target on it. Needs no stranger photos: a deployment can run it on its own
    gallery (:func:`herd_check`, which reads the gallery in blocks). Its photos are enrolment photos
    rather than queries, and the gallery lacks the left-out animal's own photos. At most
    ``max_queries`` photos (drawn with ``seed``) are asked, each against every photo. Returns the
    gallery's size as the table reads it, and a row per target."""
    _, code = np.unique(np.asarray(individuals, dtype=str), return_inverse=True)
    return herd_check(
        code, lambda asked: emb[asked], lambda: [(emb, code)], table, targets, max_queries, seed
    )


def herd_check(
    code: np.ndarray,
    vectors_of: Callable[[np.ndarray], np.ndarray],
    blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    table: OpenSetCalibration,
    targets: Sequence[float] = HERD_TARGETS,
    max_queries: int = 5000,
    seed: int = 0,
) -> tuple[int, list[HerdMates]]:
    """:func:`herd_mates` of a gallery that need not fit in memory: ``code`` is the individual (0 to
    n - 1) of each photo in the gallery's order, ``vectors_of(positions)`` the unit vectors of the
    photos asked, and ``blocks()`` yields the whole gallery as (vectors, codes) blocks. Memory holds
    the codes, the photos asked and one block."""
    if len(np.unique(code)) < 2:
        raise ValueError("a herd check needs at least two individuals")
    rng = np.random.default_rng(seed)
    asked = np.arange(len(code))
    if len(asked) > max_queries:
        asked = np.sort(rng.choice(len(code), max_queries, replace=False))
    best = best_of_others(vectors_of(asked), code[asked], blocks())
    size = table.equivalent_size(dict(zip(*np.unique(np.bincount(code), return_counts=True), strict=True)))
    draws = bootstrap_weights(code[asked], INTERVAL_DRAWS, rng)
    rows_out = []
    for target in targets:
        threshold = table.threshold(size, target)
        past = best >= threshold
        rows_out.append(
            HerdMates(
                target=target,
                threshold=threshold,
                past=float(past.mean()),
                interval=resampled_interval(past, draws),
                holding=float(np.quantile(best, 1 - target)),
            )
        )
    return size, rows_out


def best_of_others(
    queries: np.ndarray, query_code: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Per query (unit vectors of individuals ``query_code``), its best similarity to a photo of
    another individual among the gallery's (vectors, codes) ``blocks``; -inf when there is none."""
    best = np.full(len(queries), -np.inf)
    for vectors, code in blocks:
        if not len(code):
            continue
        step = max(1, SIMILARITY_BLOCK // len(code))  # queries a step: bounded memory for any block
        for start in range(0, len(queries), step):
            rows = slice(start, start + step)
            similarity = queries[rows] @ vectors.T
            similarity[query_code[rows][:, None] == code[None, :]] = -np.inf
            np.maximum(best[rows], similarity.max(axis=1), out=best[rows])
    return best
