"""The evaluation protocol, run on embeddings of test individuals (never seen in training).

:func:`evaluate_embeddings` runs the study protocol:

(a) closed-set identification: seeded enrol/query splits (half of each individual's images
    enrolled, the rest queried, groups such as video clips kept on one side); top-1, top-5, mAP;
(b) verification over all test pairs (pairs inside one group left out): ROC, AUC, EER, TAR@FAR;
(c) open set: a share of the test individuals is never enrolled and all their images (plus any
    strangers) are queries that should be answered "unknown";
(d) the FAR and TAR the calibrated threshold actually gives on test pairs;
(e) the counts behind every number.

:func:`one_shot_identification` and :func:`pair_verification_accuracy` follow the DogFaceNet paper
(Mougeot et al., PRICAI 2019), so the dog results can be set beside the published ones.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from training.data import enrol_query_split, single_group_individuals
from training.metrics import (
    best_accuracy_threshold,
    best_match,
    cmc_curve,
    decision_prf,
    identification_ranks,
    mean_average_precision,
    open_set_auroc,
    pair_scores,
    per_individual_top1,
    similarity,
    threshold_at_far,
    topk_accuracy,
    verification_accuracy,
    verification_metrics,
)
from training.model import EmbeddingModel
from training.preprocess import PreprocessSpec, normalize

log = logging.getLogger(__name__)

CMC_MAX_RANK = 20
REPORTED_FARS = (1e-2, 1e-3)

Labels = Sequence[str] | np.ndarray
"""Individual names, one per embedding: a list or a numpy array of strings."""


def embed_pixels(
    model: EmbeddingModel,
    pixels: torch.Tensor,
    spec: PreprocessSpec,
    device: str | torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    """L2-normalised embeddings (N, D) float32 of uint8 pixels (N, 3, H, W).

    Pixels go to ``device`` as uint8 and are normalised there with the shared preprocessing. The
    model (already on ``device``) is put in eval mode and left there.
    """
    pixels = torch.as_tensor(pixels)
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected uint8 pixels (N, 3, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
    device = torch.device(device)
    model.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            batch = normalize(pixels[start : start + batch_size].to(device, non_blocking=True), spec)
            if device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            chunks.append(model.embed(batch).float().cpu())
    if not chunks:
        return np.empty((0, model.embedding_dim), dtype=np.float32)
    return torch.cat(chunks).numpy()


def calibrate_threshold(val_emb: np.ndarray, val_individuals: Labels, target_far: float) -> float:
    """The similarity threshold whose false-accept rate on validation impostor pairs is ``target_far``
    (at most), from every pair of images of two different validation individuals."""
    scores, is_same = pair_scores(val_emb, np.asarray(val_individuals))
    return threshold_at_far(scores[~is_same], target_far)


# --------------------------------------------------------------------------------------------------
# The study protocol


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` over repeats: sample std (ddof=1), undefined (nan) values skipped."""
    arr = np.asarray(values, dtype=np.float64)
    defined = arr[~np.isnan(arr)]
    mean = float(defined.mean()) if defined.size else math.nan
    std = float(defined.std(ddof=1)) if defined.size > 1 else (0.0 if defined.size else math.nan)
    return {"mean": mean, "std": std, "values": [float(v) for v in arr]}


def _json_safe(value: Any) -> Any:
    """nan/inf become None (JSON has no NaN); numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class EvaluationResult:
    """Every number of one evaluation, plus the curves the report plots.

    Per-repeat metrics are lists with one value per seeded split; curves are numpy arrays.
    """

    threshold: float
    identification: dict[str, list[float]]  # top1, top5, map
    cmc: np.ndarray  # (repeats, CMC_MAX_RANK)
    verification: dict[str, float]  # auc, eer, tar_at_far_<far>
    roc_far: np.ndarray
    roc_tar: np.ndarray
    roc_thresholds: np.ndarray
    genuine: np.ndarray  # similarities of genuine test pairs
    impostor: np.ndarray  # similarities of impostor test pairs
    open_set: dict[str, list[float]]  # auroc, precision, recall, f1, unknown_accuracy (empty: not run)
    at_threshold: dict[str, float]  # far, tar on test pairs
    counts: dict[str, Any] = field(default_factory=dict)
    # Closed set, every repeat's queries together: each individual's top-1, hardest first.
    per_individual: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cmc_mean(self) -> np.ndarray:
        return self.cmc.mean(axis=0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: mean, std and per-repeat values of each metric; the mean CMC; counts."""
        return _json_safe(
            {
                "threshold": self.threshold,
                "identification": {k: summarise(v) for k, v in self.identification.items()},
                "cmc": self.cmc_mean,
                "verification": self.verification,
                "open_set": {k: summarise(v) for k, v in self.open_set.items()},
                "at_threshold": self.at_threshold,
                "counts": self.counts,
                "per_individual": self.per_individual,
            }
        )

    def summary(self) -> dict[str, Any]:
        """The headline numbers, flat and rounded (the model card's ``metrics``)."""
        out: dict[str, Any] = {}
        for name, values in self.identification.items():
            s = summarise(values)
            out[name], out[f"{name}_std"] = s["mean"], s["std"]
        out.update(self.verification)
        for name in ("auroc", "f1", "unknown_accuracy"):
            if name in self.open_set:
                out[f"open_set_{name}"] = summarise(self.open_set[name])["mean"]
        out["test_far"], out["test_tar"] = self.at_threshold["far"], self.at_threshold["tar"]
        out = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
        out["test_individuals"] = self.counts.get("individuals")
        out["test_images"] = self.counts.get("images")
        return _json_safe(out)


@dataclass
class _ClosedSetRepeat:
    metrics: dict[str, float]
    cmc: np.ndarray
    query_labels: np.ndarray
    ranks: np.ndarray
    predicted: np.ndarray  # each query's top-1 individual


def _closed_set(
    emb: np.ndarray, labels: np.ndarray, groups: np.ndarray, rng: random.Random
) -> _ClosedSetRepeat:
    enrol, query = enrol_query_split(labels.tolist(), groups.tolist(), rng)
    sim = similarity(emb[query], emb[enrol])
    ranks = identification_ranks(sim, labels[query], labels[enrol])
    metrics = {
        "top1": topk_accuracy(ranks, 1),
        "top5": topk_accuracy(ranks, 5),
        "map": mean_average_precision(sim, labels[query], labels[enrol]),
    }
    predicted, _ = best_match(sim, labels[enrol])
    return _ClosedSetRepeat(metrics, cmc_curve(ranks, CMC_MAX_RANK), labels[query], ranks, predicted)


def _open_set(
    emb: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    n_unknown: int,
    threshold: float,
    rng: random.Random,
    strangers_emb: np.ndarray | None,
) -> tuple[dict[str, float], int, int]:
    unknown = set(rng.sample(sorted(set(labels.tolist())), n_unknown))
    is_unknown_individual = np.array([label in unknown for label in labels.tolist()])
    known_idx = np.flatnonzero(~is_unknown_individual)
    enrol, known_query = enrol_query_split(labels[known_idx].tolist(), groups[known_idx].tolist(), rng)
    enrol, known_query = known_idx[enrol], known_idx[known_query]
    query_emb = [emb[known_query], emb[is_unknown_individual]]
    if strangers_emb is not None:
        query_emb.append(strangers_emb)
    query_emb_all = np.concatenate(query_emb)
    n_unknown_queries = len(query_emb_all) - len(known_query)
    is_known = np.arange(len(query_emb_all)) < len(known_query)
    top_label, top_score = best_match(similarity(query_emb_all, emb[enrol]), labels[enrol])
    correct = np.zeros(len(query_emb_all), dtype=bool)
    correct[is_known] = top_label[is_known] == labels[known_query]
    decision = decision_prf(top_score, correct, is_known, threshold)
    # Without a known query (every known individual has a single image) there is nothing to rank.
    both = is_known.any() and not is_known.all()
    auroc = open_set_auroc(top_score[is_known], top_score[~is_known]) if both else math.nan
    metrics = {"auroc": auroc, **decision._asdict()}
    return metrics, len(known_query), n_unknown_queries


def evaluate_embeddings(
    emb: np.ndarray,
    individuals: Labels,
    groups: Labels,
    *,
    threshold: float,
    n_repeats: int = 5,
    unknown_fraction: float = 0.25,
    seed: int = 0,
    strangers_emb: np.ndarray | None = None,
    strangers_individuals: Labels | None = None,
) -> EvaluationResult:
    """Run the protocol (module docstring) on the embeddings of test images.

    ``threshold`` is the decision threshold calibrated on validation individuals. Strangers
    (animals never seen in training, e.g. the open-set cows) are extra queries that are always
    unknown; their ids must not be test individuals. Everything is reproducible from ``seed``.
    """
    emb = np.asarray(emb, dtype=np.float32)
    labels, groups_arr = np.asarray(individuals), np.asarray(groups)
    if not len(emb) == len(labels) == len(groups_arr):
        raise ValueError(f"{len(emb)} embeddings, {len(labels)} individuals and {len(groups_arr)} groups")
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be at least 1, got {n_repeats}")
    n_individuals = len(set(labels.tolist()))
    if n_individuals < 2:
        raise ValueError("evaluation needs at least two test individuals")
    stranger_ids = set() if strangers_individuals is None else set(np.asarray(strangers_individuals).tolist())
    if stranger_ids & set(labels.tolist()):
        raise ValueError(
            f"strangers overlap test individuals: {sorted(stranger_ids & set(labels.tolist()))[:5]}"
        )
    if strangers_emb is not None:
        strangers_emb = np.asarray(strangers_emb, dtype=np.float32)
    rng = random.Random(seed)

    repeats = [_closed_set(emb, labels, groups_arr, rng) for _ in range(n_repeats)]
    identification = {name: [r.metrics[name] for r in repeats] for name in ("top1", "top5", "map")}
    per_individual = per_individual_top1(
        *(np.concatenate([getattr(r, a) for r in repeats]) for a in ("query_labels", "ranks", "predicted"))
    )

    scores, is_same = pair_scores(emb, labels, groups_arr)
    genuine, impostor = scores[is_same], scores[~is_same]

    n_unknown = (
        min(max(round(unknown_fraction * n_individuals), 1), n_individuals - 1) if unknown_fraction > 0 else 0
    )
    open_set: dict[str, list[float]] = {}
    open_known_queries, open_unknown_queries = [], []
    if n_unknown or strangers_emb is not None:
        for _ in range(n_repeats):
            metrics, n_known, n_unknown_q = _open_set(
                emb, labels, groups_arr, n_unknown, threshold, rng, strangers_emb
            )
            for name, value in metrics.items():
                open_set.setdefault(name, []).append(value)
            open_known_queries.append(n_known)
            open_unknown_queries.append(n_unknown_q)

    n_pairs_all = len(emb) * (len(emb) - 1) // 2
    counts = {
        "individuals": n_individuals,
        "images": len(emb),
        "single_group_individuals": len(single_group_individuals(labels.tolist(), groups_arr.tolist())),
        "repeats": n_repeats,
        "closed_set_queries": [len(r.ranks) for r in repeats],
        "genuine_pairs": len(genuine),
        "impostor_pairs": len(impostor),
        "same_group_pairs_left_out": n_pairs_all - len(scores),
        "open_set_unknown_individuals": n_unknown,
        "open_set_known_queries": open_known_queries,
        "open_set_unknown_queries": open_unknown_queries,
        "strangers_images": 0 if strangers_emb is None else len(strangers_emb),
        "strangers_individuals": len(stranger_ids),
    }
    verification, (far, tar, thresholds) = verification_metrics(scores, is_same, REPORTED_FARS)
    return EvaluationResult(
        threshold=float(threshold),
        identification=identification,
        cmc=np.stack([r.cmc for r in repeats]),
        verification=verification,
        roc_far=far,
        roc_tar=tar,
        roc_thresholds=thresholds,
        genuine=genuine,
        impostor=impostor,
        open_set=open_set,
        at_threshold=rates_at(genuine, impostor, threshold),
        counts=counts,
        per_individual=per_individual,
    )


def rates_at(genuine: np.ndarray, impostor: np.ndarray, threshold: float) -> dict[str, float]:
    """``{"far", "tar"}``: shares of impostor and genuine pairs scoring at or above ``threshold``
    (nan without such pairs)."""
    return {
        "far": float(np.mean(impostor >= threshold)) if len(impostor) else math.nan,
        "tar": float(np.mean(genuine >= threshold)) if len(genuine) else math.nan,
    }


# --------------------------------------------------------------------------------------------------
# DogFaceNet paper protocols


def one_shot_identification(
    emb: np.ndarray, individuals: Labels, seed: int = 0, n_repeats: int = 5, groups: Labels | None = None
) -> dict[str, Any]:
    """One-shot identification: the gallery holds ONE random image per individual, every other
    image is a query. Rank-1 and rank-5 accuracy as ``{"mean", "std", "values"}`` over repeats.

    With ``groups``, images of the enrolled image's group (its video clip) are not queries, as in
    the main protocol. Individuals left without queries stay in the gallery as distractors.
    """
    labels = np.asarray(individuals)
    group_arr = np.arange(len(labels)) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    rank1, rank5 = [], []
    n_queries = 0
    for _ in range(n_repeats):
        perm = rng.permutation(len(labels))
        _, first = np.unique(labels[perm], return_index=True)
        gallery = np.zeros(len(labels), dtype=bool)
        gallery[perm[first]] = True
        enrolled_group = dict(zip(labels[gallery].tolist(), group_arr[gallery].tolist(), strict=True))
        query = ~gallery & np.array(
            [g != enrolled_group[label] for label, g in zip(labels.tolist(), group_arr.tolist(), strict=True)]
        )
        ranks = identification_ranks(similarity(emb[query], emb[gallery]), labels[query], labels[gallery])
        rank1.append(topk_accuracy(ranks, 1))
        rank5.append(topk_accuracy(ranks, 5))
        n_queries = int(query.sum())
    return {"rank1": summarise(rank1), "rank5": summarise(rank5), "queries": n_queries, "gallery": len(first)}


def balanced_pairs(
    emb: np.ndarray, individuals: Labels, seed: int = 0, groups: Labels | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every genuine pair plus as many impostor pairs drawn at random (seeded, without replacement):
    ``(scores, is_same)``. Fewer impostor pairs than genuine ones are all taken. With ``groups``,
    pairs within one group (two frames of a clip) are left out."""
    scores, is_same = pair_scores(
        emb, np.asarray(individuals), None if groups is None else np.asarray(groups)
    )
    genuine = np.flatnonzero(is_same)
    impostors = np.flatnonzero(~is_same)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(impostors, size=min(len(genuine), len(impostors)), replace=False)
    keep = np.concatenate([genuine, np.sort(chosen)])
    return scores[keep], is_same[keep]


def accuracy_threshold(
    val_emb: np.ndarray, val_individuals: Labels, seed: int = 0, groups: Labels | None = None
) -> float:
    """The threshold of best accuracy on balanced validation pairs, for :func:`pair_verification_accuracy`."""
    return best_accuracy_threshold(*balanced_pairs(val_emb, val_individuals, seed, groups))


def pair_verification_accuracy(
    test_emb: np.ndarray,
    test_individuals: Labels,
    threshold: float,
    seed: int = 0,
    groups: Labels | None = None,
) -> float:
    """Accuracy on balanced test pairs (all genuine pairs, as many random impostor pairs) at a
    threshold chosen on validation data (:func:`accuracy_threshold`)."""
    return verification_accuracy(*balanced_pairs(test_emb, test_individuals, seed, groups), threshold)
