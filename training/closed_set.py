"""Closed-set evaluation: new photos of individuals the model WAS trained on.

A farm enrolls its herd and identifies the same animals for years; once its enrolled photos are
used for training, the question is how well the model recognises those animals in photos taken at
another time. That is measured here, beside the unseen-individual protocol of
:mod:`training.evaluate` and with the same metrics:

- whole *sessions* (a group key: video clip, date, enrolment batch) of each training individual are
  held back from training (:func:`hold_back_sessions`); never single images at random, which would
  put near-duplicate frames of one clip on both sides;
- the training photos are the gallery, the held-back photos the queries
  (:func:`evaluate_closed_set`): top-1, top-5, mAP and CMC; verification over every
  (query, gallery) pair: AUC, EER, TAR@FAR, and the FAR/TAR at the decision threshold; plus, at
  that threshold, the share of queries answered with the right individual and with a wrong one;
  with a :class:`ConfidenceFloor`, as a service with a minimum match confidence answers: a best
  candidate past the threshold but below the floor is ``uncertain``, neither right nor wrong.

An individual with a single session cannot be held back without splitting that session: it stays
whole in training (it is still in the gallery as a distractor) and is counted.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data import Shard
from training.evaluate import CMC_MAX_RANK, REPORTED_FARS, EvaluationResult, embed_pixels, rates_at
from training.metrics import (
    best_match,
    cmc_curve,
    identification_ranks,
    individual_scores,
    mean_average_precision,
    per_individual_top1,
    similarity,
    topk_accuracy,
    verification_metrics,
)
from training.model import EmbeddingModel
from training.open_set import OpenSetCalibration
from training.preprocess import PreprocessSpec


@dataclass(frozen=True)
class SessionSplit:
    """Indices into the samples: ``train`` (also the closed-set gallery) and ``held`` (queries)."""

    train: np.ndarray
    held: np.ndarray
    single_session: tuple[str, ...]  # individuals with one session, kept whole in training


def hold_back_sessions(
    individuals: Sequence[str], groups: Sequence[str], held_fraction: float, seed: int
) -> SessionSplit:
    """Per individual, hold back about ``held_fraction`` of its sessions (at least one, never all).

    Seeded per individual, so adding an animal to a gallery does not move the other animals' sessions.
    """
    if not 0 < held_fraction < 1:
        raise ValueError(f"held_fraction must be in (0, 1), got {held_fraction}")
    if len(individuals) != len(groups):
        raise ValueError(f"{len(individuals)} individuals and {len(groups)} groups")
    sessions: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (individual, group) in enumerate(zip(individuals, groups, strict=True)):
        sessions[individual][group].append(i)
    train: list[int] = []
    held: list[int] = []
    single: list[str] = []
    for individual in sorted(sessions):
        keys = sorted(sessions[individual])
        if len(keys) < 2:
            single.append(individual)
            train.extend(sessions[individual][keys[0]])
            continue
        random.Random(f"{seed}:{individual}").shuffle(keys)
        n_held = min(len(keys) - 1, max(1, round(len(keys) * held_fraction)))
        for k, key in enumerate(keys):
            (held if k < n_held else train).extend(sessions[individual][key])
    return SessionSplit(
        np.array(sorted(train), dtype=np.int64), np.array(sorted(held), dtype=np.int64), tuple(single)
    )


@dataclass(frozen=True)
class ConfidenceFloor:
    """A minimum match confidence: a best candidate past the threshold whose calibrated confidence
    (``table``'s, for a gallery the table reads as ``gallery_size`` images) is below ``minimum`` is
    answered ``uncertain``, not ``match``."""

    table: OpenSetCalibration
    gallery_size: int
    minimum: float
    stranger_share: float | None = None  # None: the calibration's

    def confidence(self, best: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Per query, from its best individual's similarity and the second's (-inf: none)."""
        return np.array(
            [
                self.table.probability(
                    float(b), self.gallery_size, float(s) if np.isfinite(s) else None, self.stranger_share
                )
                for b, s in zip(best, second, strict=True)
            ],
            dtype=np.float64,
        )


def evaluate_closed_set(
    gallery_emb: np.ndarray,
    gallery_individuals: Sequence[str] | np.ndarray,
    query_emb: np.ndarray,
    query_individuals: Sequence[str] | np.ndarray,
    *,
    threshold: float,
    floor: ConfidenceFloor | None = None,
) -> EvaluationResult:
    """Held-back photos (queries) against the training photos (gallery) of the same individuals.

    The result has the fields of the unseen-individual protocol; there is one split (the sessions
    held back before training), so each identification metric has one value, and no open set (every
    query's individual is enrolled: strangers are the unseen protocol's business). With a ``floor``,
    the right and wrong match rates leave out the answers it holds back, counted as ``held_back_rate``
    (and those of them whose best candidate was wrong as ``held_back_wrong_rate``).
    """
    gallery_emb = np.asarray(gallery_emb, dtype=np.float32)
    query_emb = np.asarray(query_emb, dtype=np.float32)
    g_labels, q_labels = np.asarray(gallery_individuals), np.asarray(query_individuals)
    if len(gallery_emb) != len(g_labels) or len(query_emb) != len(q_labels):
        raise ValueError("embeddings and individuals differ in length")
    if not len(q_labels):
        raise ValueError("closed-set evaluation needs held-back photos (no individual has two sessions)")
    missing = set(q_labels.tolist()) - set(g_labels.tolist())
    if missing:
        raise ValueError(f"queries of individuals absent from the gallery: {sorted(missing)[:5]}")
    sim = similarity(query_emb, gallery_emb)
    ranks = identification_ranks(sim, q_labels, g_labels)
    predicted, top_score = best_match(sim, g_labels)
    answered = top_score >= threshold
    held_back = np.zeros_like(answered)
    if floor is not None:
        held_back = answered & (floor.confidence(top_score, second_best(sim, g_labels)) < floor.minimum)
        answered &= ~held_back
    right = predicted == q_labels
    scores = sim.ravel()
    is_same = (q_labels[:, None] == g_labels[None, :]).ravel()
    genuine, impostor = scores[is_same], scores[~is_same]
    verification, (far, tar, thresholds) = verification_metrics(scores, is_same, REPORTED_FARS)
    return EvaluationResult(
        threshold=float(threshold),
        identification={
            "top1": [topk_accuracy(ranks, 1)],
            "top5": [topk_accuracy(ranks, 5)],
            "map": [mean_average_precision(sim, q_labels, g_labels)],
            "right_match_rate": [float(np.mean(answered & right))],
            "wrong_match_rate": [float(np.mean(answered & ~right))],
        }
        | (
            {
                "held_back_rate": [float(np.mean(held_back))],
                "held_back_wrong_rate": [float(np.mean(held_back & ~right))],
            }
            if floor is not None
            else {}
        ),
        cmc=cmc_curve(ranks, CMC_MAX_RANK)[None, :],
        verification=verification,
        roc_far=far,
        roc_tar=tar,
        roc_thresholds=thresholds,
        genuine=genuine,
        impostor=impostor,
        open_set={},
        at_threshold=rates_at(genuine, impostor, threshold),
        counts={
            "individuals": len(set(q_labels.tolist())),
            "images": len(q_labels),
            "gallery_images": len(g_labels),
            "gallery_individuals": len(set(g_labels.tolist())),
            "repeats": 1,
            "closed_set_queries": [len(q_labels)],
            "genuine_pairs": len(genuine),
            "impostor_pairs": len(impostor),
        },
        per_individual=per_individual_top1(q_labels, ranks, predicted),
    )


def second_best(sim: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """Per query, the score of its second-best gallery individual (-inf with one individual)."""
    _, scores = individual_scores(sim, gallery_labels)
    if scores.shape[1] < 2:
        return np.full(len(scores), -np.inf)
    return np.partition(scores, -2, axis=1)[:, -2]


def herd_mates_matched(
    emb: np.ndarray,
    individuals: Sequence[str] | np.ndarray,
    asked: Sequence[str],
    threshold: float,
    floor: ConfidenceFloor | None = None,
) -> float:
    """The share of the photos of the ``asked`` individuals answered ``match`` when each is left out
    of a gallery of every photo (``emb``, of ``individuals``): how a herd-mate nobody enrolled would
    fare. ``match``: the best other individual at or past ``threshold`` and, with a ``floor``, its
    confidence at least the floor's minimum."""
    labels = np.asarray(individuals)
    queries = np.isin(labels, np.asarray(asked))
    if not queries.any():
        raise ValueError("no photo of the asked individuals")
    sim = similarity(np.asarray(emb)[queries], np.asarray(emb))
    sim[labels[queries][:, None] == labels[None, :]] = -np.inf  # each left out of the gallery
    _, top = best_match(sim, labels)
    answered = top >= threshold
    if floor is not None:
        answered &= floor.confidence(top, second_best(sim, labels)) >= floor.minimum
    return float(answered.mean())


def evaluate_held_back(
    model: EmbeddingModel,
    spec: PreprocessSpec,
    gallery: Shard,
    held: Shard,
    threshold: float,
    floor: ConfidenceFloor | None = None,
) -> EvaluationResult:
    """:func:`evaluate_closed_set` of ``model`` with ``gallery`` (training photos) and ``held`` photos."""
    device = next(model.parameters()).device
    return evaluate_closed_set(
        embed_pixels(model, gallery.pixels, spec, device),
        gallery.individuals,
        embed_pixels(model, held.pixels, spec, device),
        held.individuals,
        threshold=threshold,
        floor=floor,
    )


# Rows of the side-by-side table: (summary key, label).
COMPARED = (
    ("top1", "top-1"),
    ("top5", "top-5"),
    ("map", "mAP"),
    ("auc", "verification AUC"),
    ("eer", "EER"),
    ("tar_at_far_0.01", "TAR @ FAR 1e-2"),
    ("tar_at_far_0.001", "TAR @ FAR 1e-3"),
    ("test_far", "FAR at the threshold"),
    ("test_tar", "TAR at the threshold"),
    ("test_individuals", "individuals queried"),
    ("test_images", "query images"),
)


def side_by_side(unseen: dict[str, Any], closed: dict[str, Any], threshold: float) -> str:
    """Markdown: the two protocols' headline numbers (``EvaluationResult.summary()``) side by side."""

    def cell(summary: dict[str, Any], key: str) -> str:
        value = summary.get(key)
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        "\n## Closed set: held-back sessions of training individuals, beside unseen individuals\n",
        f"Threshold {threshold:.4f} for both. Closed set: the training photos of each individual are the "
        "gallery, photos of sessions held back from training are the queries (one split). Unseen: "
        "test individuals never seen in training (enrol/query halves, mean over repeats).\n",
        "| metric | unseen individuals | closed set (held-back sessions) |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {cell(unseen, key)} | {cell(closed, key)} |" for key, label in COMPARED]
    lines.append(f"| wrong-match rate at the threshold | - | {cell(closed, 'wrong_match_rate')} |\n")
    return "\n".join(lines)
