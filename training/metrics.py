"""Face-ID metrics on cosine similarities: identification, retrieval, verification and open set.

Conventions, shared by every function here:

* Scores are cosine similarities; higher means more alike. A pair (or a query) is *accepted* as a
  match when ``score >= threshold``.
* Identification aggregates per individual: an individual's score for a query is the maximum over
  its gallery images (what the service does when it answers with individuals, not images).
* Ties count against the model. A query whose true individual ties with another one gets the worse
  rank, and tied gallery images are ordered irrelevant-first for average precision, so a collapsed
  model (every embedding equal) scores chance, never 100 %.
* Undefined values (a precision with no accepted query, an accuracy over no unknown query) are
  ``nan``, never a made-up 0 or 1.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.result_type(x.dtype, np.float32), copy=False)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix (len(a), len(b)) between the rows of ``a`` and ``b``.

    Rows are L2-normalised here (a no-op for ``EmbeddingNet.embed`` output); float32 inputs give a
    float32 matrix.
    """
    a, b = _as_float(a), _as_float(b)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


# --------------------------------------------------------------------------------------------------
# Identification (1:N): per-individual scores, ranks, top-k, CMC


def individual_scores(sim: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse a (queries, gallery images) similarity matrix to (queries, gallery individuals).

    Returns ``(individuals, scores)``: the sorted distinct gallery labels and, per query, the best
    similarity to any image of each individual.
    """
    sim = np.asarray(sim)
    gallery_labels = np.asarray(gallery_labels)
    if sim.ndim != 2 or sim.shape[1] != len(gallery_labels):
        raise ValueError(f"similarity matrix {sim.shape} does not match {len(gallery_labels)} gallery labels")
    individuals, inverse = np.unique(gallery_labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(individuals)))
    return individuals, np.maximum.reduceat(sim[:, order], starts, axis=1)


def identification_ranks(sim: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """1-based rank of each query's true individual among the gallery individuals.

    The rank is the number of gallery individuals scoring at least as high as the true one (ties
    count against). Every query's individual must be in the gallery (closed set).
    """
    individuals, scores = individual_scores(sim, gallery_labels)
    query_labels = np.asarray(query_labels)
    column = np.searchsorted(individuals, query_labels)
    column = np.minimum(column, len(individuals) - 1)
    missing = individuals[column] != query_labels
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} queries have no gallery image of their individual (closed set)"
        )
    true_score = scores[np.arange(len(query_labels)), column]
    return (scores >= true_score[:, None]).sum(axis=1).astype(np.int64)


def topk_accuracy(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose true individual is among the top ``k``."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return float("nan")
    return float(np.mean(ranks <= k))


def cmc_curve(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """Cumulative match characteristic: ``cmc[k - 1] = topk_accuracy(ranks, k)`` for k = 1..max_rank."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return np.full(max_rank, np.nan)
    return np.array([np.mean(ranks <= k) for k in range(1, max_rank + 1)])


def best_match(sim: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the top-1 gallery individual and its score: ``(labels, scores)``."""
    individuals, scores = individual_scores(sim, gallery_labels)
    top = np.argmax(scores, axis=1)
    return individuals[top], scores[np.arange(len(scores)), top]


def per_individual_top1(
    query_labels: np.ndarray, ranks: np.ndarray, predicted: np.ndarray
) -> list[dict[str, Any]]:
    """Each query individual's top-1 accuracy, hardest first (then by name), with the individual its
    wrongly answered queries were most often given (``None`` when none was wrong).

    ``ranks`` are :func:`identification_ranks` of the queries, ``predicted`` their top-1 answers
    (:func:`best_match`); queries of several repeats may be concatenated.
    """
    query_labels, ranks, predicted = np.asarray(query_labels), np.asarray(ranks), np.asarray(predicted)
    rows = []
    for individual in np.unique(query_labels):
        mine = query_labels == individual
        wrong = predicted[mine & (ranks > 1)]
        names, counts = np.unique(wrong, return_counts=True)
        confused = names[np.argmax(counts)].item() if len(names) else None
        rows.append(
            {
                "individual": individual.item(),
                "queries": int(mine.sum()),
                "top1": float(np.mean(ranks[mine] == 1)),
                "confused_with": confused,
                "confused_count": int(counts.max()) if len(counts) else 0,
            }
        )
    return sorted(rows, key=lambda r: (r["top1"], str(r["individual"])))


# --------------------------------------------------------------------------------------------------
# Retrieval: mean average precision over gallery images


def mean_average_precision(
    sim: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, chunk: int = 1024
) -> float:
    """Image-level retrieval mAP.

    For each query the gallery images are sorted by similarity; its AP is the mean, over the
    relevant images (same individual), of the precision at each relevant image's position. Queries
    with no relevant gallery image are left out; ``nan`` when none is left.
    """
    sim = np.asarray(sim)
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    aps: list[np.ndarray] = []
    positions = np.arange(1, sim.shape[1] + 1)
    for start in range(0, len(sim), chunk):
        rows = slice(start, start + chunk)
        relevant = query_labels[rows, None] == gallery_labels[None, :]
        # Primary key: similarity, descending; secondary: irrelevant first among ties.
        order = np.lexsort((relevant, -sim[rows]), axis=-1)
        hits = np.take_along_axis(relevant, order, axis=1)
        n_relevant = hits.sum(axis=1)
        precision = np.cumsum(hits, axis=1) / positions
        keep = n_relevant > 0
        aps.append((precision * hits).sum(axis=1)[keep] / n_relevant[keep])
    ap = np.concatenate(aps) if aps else np.empty(0)
    return float(ap.mean()) if ap.size else float("nan")


# --------------------------------------------------------------------------------------------------
# Verification (1:1) over pairs


def pair_scores(
    emb: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Similarity of every unordered pair ``i < j`` (row-major order) and whether it is genuine.

    With ``groups`` (e.g. the video clip of each frame), pairs of the same group are left out: two
    frames of one clip are near-duplicates, not two sightings. Works block by block, so the peak
    memory is the output (n^2/2 float32 scores and booleans: about 160 MB for 8,000 embeddings)
    plus one (block, n) slice, never the full matrix.
    """
    emb = _as_float(emb)
    codes = np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1)
    group_codes = (
        None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    )
    n = len(emb)
    if len(codes) != n or (group_codes is not None and len(group_codes) != n):
        raise ValueError(f"{n} embeddings but {len(codes)} labels")
    scores = np.empty(n * (n - 1) // 2, dtype=emb.dtype)
    is_same = np.empty(len(scores), dtype=bool)
    offset = 0
    for start in range(0, n, block):
        stop = min(start + block, n)
        keep = np.arange(n)[None, :] > np.arange(start, stop)[:, None]
        if group_codes is not None:
            keep &= group_codes[start:stop, None] != group_codes[None, :]
        count = int(keep.sum())
        scores[offset : offset + count] = similarity(emb[start:stop], emb)[keep]
        is_same[offset : offset + count] = (codes[start:stop, None] == codes[None, :])[keep]
        offset += count
    return scores[:offset], is_same[:offset]


def _check_pairs(scores: np.ndarray, is_same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, is_same = np.asarray(scores), np.asarray(is_same, dtype=bool)
    if scores.shape != is_same.shape:
        raise ValueError(f"{scores.shape} scores but {is_same.shape} labels")
    if is_same.all() or not is_same.any():
        raise ValueError("verification needs both genuine and impostor pairs")
    return scores, is_same


def roc(scores: np.ndarray, is_same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of accepting pairs with ``score >= threshold``: ``(far, tar, thresholds)``.

    Points run from the strictest threshold (+inf: nothing accepted) to the loosest (the lowest
    score: everything accepted). For each distinct genuine score g there is the point at g and,
    where it differs, the point just above g; together they hold every corner of the step curve,
    so TAR@FAR, the EER and the AUC are exact (a genuine score tied with impostor scores gives a
    diagonal step, as in scikit-learn's ``roc_curve``). Sorting the two classes apart and counting
    by binary search takes 0.5-1.5 s for 30 M pairs on 2 CPU cores; ``roc_curve`` took 18 s.
    """
    scores, is_same = _check_pairs(scores, is_same)
    scores = _as_float(scores)
    genuine, impostor = np.sort(scores[is_same]), np.sort(scores[~is_same])
    values = np.unique(genuine)[::-1]

    def accepted(sorted_scores: np.ndarray, side: Literal["left", "right"]) -> np.ndarray:
        # side "left": fraction of scores >= value; "right": fraction > value (counts first: exact)
        n = len(sorted_scores)
        return (n - np.searchsorted(sorted_scores, values, side=side)) / n

    far = np.column_stack([accepted(impostor, "right"), accepted(impostor, "left")]).reshape(-1)
    tar = np.column_stack([accepted(genuine, "right"), accepted(genuine, "left")]).reshape(-1)
    above = np.nextafter(values, np.inf, dtype=scores.dtype)
    thresholds = np.column_stack([above, values]).reshape(-1).astype(np.float64)
    far = np.concatenate([[0.0], far, [1.0]])
    tar = np.concatenate([[0.0], tar, [1.0]])
    thresholds = np.concatenate([[np.inf], thresholds, [float(scores.min())]])
    keep = np.concatenate([[True], (np.diff(far) != 0) | (np.diff(tar) != 0)])
    return far[keep], tar[keep], thresholds[keep]


def _roc_auc(far: np.ndarray, tar: np.ndarray) -> float:
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))


def _roc_eer(far: np.ndarray, tar: np.ndarray) -> float:
    gap = far - (1.0 - tar)  # non-decreasing along the curve: -1 at the start, +1 at the end
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0 or i == 0:
        return float(far[i])
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(far[i - 1] + t * (far[i] - far[i - 1]))


def _roc_tar_at(far: np.ndarray, tar: np.ndarray, target: float) -> float:
    return float(tar[far <= target].max())


def auc(scores: np.ndarray, is_same: np.ndarray) -> float:
    """Area under the ROC: the probability that a random genuine pair outscores a random impostor
    pair (ties count one half)."""
    return _roc_auc(*roc(scores, is_same)[:2])


def eer(scores: np.ndarray, is_same: np.ndarray) -> float:
    """Equal error rate: where FAR equals FRR = 1 - TAR, interpolated linearly along the ROC."""
    return _roc_eer(*roc(scores, is_same)[:2])


def tar_at_far(scores: np.ndarray, is_same: np.ndarray, far: float) -> float:
    """Best TAR among the thresholds whose FAR is at most ``far`` (FaceNet's VAL at a given FAR).

    That is the TAR at the loosest threshold that still keeps FAR <= ``far``; no interpolation.
    """
    return _roc_tar_at(*roc(scores, is_same)[:2], far)


def verification_metrics(
    scores: np.ndarray, is_same: np.ndarray, fars: tuple[float, ...] = (1e-2, 1e-3)
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """AUC, EER and ``tar_at_far_<far>`` for each of ``fars`` from one ROC, and that ROC."""
    curve = roc(scores, is_same)
    far, tar, _ = curve
    metrics = {"auc": _roc_auc(far, tar), "eer": _roc_eer(far, tar)}
    for target in fars:
        metrics[f"tar_at_far_{target:g}"] = _roc_tar_at(far, tar, target)
    return metrics, curve


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """The loosest threshold accepting at most a ``far`` fraction of these impostor pairs.

    With ``k = floor(far * n)`` false accepts allowed out of ``n`` impostors, the threshold is the
    next float above the (k+1)-th highest impostor score, so exactly the impostors scoring above
    that one are accepted (at most k of them; fewer when it ties with higher ones). It is taken in
    the scores' own precision (float32 scores: the next float32), so comparing it with float32 or
    float64 copies of the scores gives the same decisions.
    """
    impostor_scores = _as_float(impostor_scores)
    n = len(impostor_scores)
    if n == 0:
        raise ValueError("no impostor scores to calibrate on")
    if not 0.0 <= far < 1.0:
        raise ValueError(f"target FAR must be in [0, 1), got {far}")
    allowed = int(np.floor(far * n + 1e-9))
    kth = -np.partition(-impostor_scores, allowed)[allowed]  # the (allowed+1)-th highest score
    return float(np.nextafter(kth, np.inf, dtype=impostor_scores.dtype))


def verification_accuracy(scores: np.ndarray, is_same: np.ndarray, threshold: float) -> float:
    """Fraction of pairs decided right when accepting ``score >= threshold``."""
    scores, is_same = np.asarray(scores), np.asarray(is_same, dtype=bool)
    return float(np.mean((scores >= threshold) == is_same))


def best_accuracy_threshold(scores: np.ndarray, is_same: np.ndarray) -> float:
    """The threshold with the highest :func:`verification_accuracy` on these pairs.

    Candidates are the lowest score (accept all), the midpoints between consecutive distinct
    scores, and the next float above the highest score (reject all), all in the scores' precision;
    the lowest of equally good candidates wins.
    """
    scores, is_same = _check_pairs(scores, is_same)
    values, inverse = np.unique(_as_float(scores), return_inverse=True)
    genuine_at = np.bincount(inverse, weights=is_same, minlength=len(values))
    impostor_at = np.bincount(inverse, weights=~is_same, minlength=len(values))
    # Candidate c accepts values[c:]: right = accepted genuine + rejected impostors.
    genuine_accepted = np.concatenate([np.cumsum(genuine_at[::-1])[::-1], [0.0]])
    impostor_rejected = np.concatenate([[0.0], np.cumsum(impostor_at)])
    correct = genuine_accepted + impostor_rejected
    middle = values[:-1] / 2 + values[1:] / 2
    middle = np.where(middle > values[:-1], middle, values[1:])  # adjacent floats have no midpoint
    candidates = np.concatenate([values[:1], middle, [np.nextafter(values[-1], np.inf, dtype=values.dtype)]])
    return float(candidates[int(np.argmax(correct))])


# --------------------------------------------------------------------------------------------------
# Open set: is the query's individual enrolled at all?


def open_set_auroc(known_max_scores: np.ndarray, unknown_max_scores: np.ndarray) -> float:
    """AUROC of telling unknown queries from known ones by their top-1 similarity.

    Equals the probability that a random known query's top-1 score exceeds a random unknown
    query's (ties count one half); 0.5 is chance.
    """
    known, unknown = np.asarray(known_max_scores), np.asarray(unknown_max_scores)
    if known.size == 0 or unknown.size == 0:
        raise ValueError("open-set AUROC needs both known and unknown queries")
    is_known = np.concatenate([np.ones(known.size, bool), np.zeros(unknown.size, bool)])
    return auc(np.concatenate([known, unknown]), is_known)


class OpenSetDecision(NamedTuple):
    """Quality of the answer "this is individual X" (score >= threshold) versus "unknown"."""

    precision: float  # right matches / all match answers (nan when nothing was matched)
    recall: float  # right matches / known queries (nan without known queries)
    f1: float  # 2 TP / (match answers + known queries)
    unknown_accuracy: float  # unknown queries answered "unknown" / unknown queries (nan without any)


def decision_prf(
    top1_scores: np.ndarray, top1_correct: np.ndarray, is_known: np.ndarray, threshold: float
) -> OpenSetDecision:
    """Precision, recall and F1 of the match/unknown decision, and the accuracy on unknowns.

    A query is answered with its top-1 individual when ``top1_score >= threshold``, else "unknown".
    A match answer is a true positive only when the query's individual is enrolled and the top-1
    individual is it; recall is over known queries.
    """
    scores = np.asarray(top1_scores)
    correct, known = np.asarray(top1_correct, dtype=bool), np.asarray(is_known, dtype=bool)
    matched = scores >= threshold
    tp = int(np.sum(matched & correct & known))
    n_matched, n_known, n_unknown = int(matched.sum()), int(known.sum()), int((~known).sum())
    nan = float("nan")
    return OpenSetDecision(
        precision=tp / n_matched if n_matched else nan,
        recall=tp / n_known if n_known else nan,
        f1=2 * tp / (n_matched + n_known) if n_matched + n_known else nan,
        unknown_accuracy=float(np.sum(~matched & ~known)) / n_unknown if n_unknown else nan,
    )
