"""1:N identification and 1:1 verification, with the open-set decision made server-side."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy.orm import Session

from service.db.health import UNAVAILABLE
from service.db.repository import Repository
from service.errors import IndividualNotFound, InvalidRequest, SpeciesMismatch
from service.image_store import ImageStore
from service.metrics import Metrics
from service.ml.images import DecodedImage, ImagePolicy, decode_image, decode_images
from service.ml.registry import Registry, Serving
from service.schemas import (
    CandidatePublic,
    IdentifyDecision,
    IdentifyResult,
    ThresholdSource,
    Timings,
    VerifyResult,
)
from service.services import review
from training.artifact import ModelCard
from training.closed_set import ConfidenceFloor
from training.open_set import OpenSetCalibration


def effective_threshold(
    card: ModelCard | None, default: float, requested: float | None
) -> tuple[float, ThresholdSource]:
    """The request's threshold, else the model card's calibrated one, else the configured default."""
    if requested is not None:
        return float(requested), "request"
    if card is not None and card.threshold is not None:
        return float(card.threshold), "model_card"
    return float(default), "default"


@dataclass(frozen=True)
class Limits:
    images: ImagePolicy
    default_threshold: float
    default_top_k: int
    max_top_k: int
    target_fpir: float = 0.01
    target_fpir_by_species: dict[str, float] = field(default_factory=dict)
    review_fpir: float = 0.05
    stranger_share: float | None = None  # None: the model card's calibration mix
    stranger_share_by_species: dict[str, float] = field(default_factory=dict)
    # a best candidate past the threshold but less likely right than this is uncertain (0: none)
    min_match_confidence: float = 0.5
    min_match_confidence_by_species: dict[str, float] = field(default_factory=dict)

    def fpir_for(self, species: str) -> float:
        return self.target_fpir_by_species.get(species, self.target_fpir)

    def min_confidence_for(self, species: str) -> float:
        return self.min_match_confidence_by_species.get(species, self.min_match_confidence)

    def stranger_share_for(self, species: str) -> float | None:
        return self.stranger_share_by_species.get(species, self.stranger_share)


@dataclass(frozen=True)
class OperatingPoint:
    """How an identify answer is decided: the match threshold, the lower edge of the uncertain band,
    the confidence a match needs, the confidence table, and why."""

    threshold: float
    source: ThresholdSource
    reason: str
    review_threshold: float | None = None
    target_fpir: float | None = None
    table: OpenSetCalibration | None = None
    table_size: int = 0  # the gallery as the table reads it (OpenSetCalibration.equivalent_size)
    min_confidence: float | None = None  # a best candidate past the threshold below it is uncertain

    def held_back(self, similarity: float | None, confidence: float | None) -> bool:
        """Whether a best candidate past the threshold is too likely wrong to be a match: its
        confidence is below the configured floor (a close second individual, say)."""
        return (
            self.min_confidence is not None
            and similarity is not None
            and confidence is not None
            and similarity >= self.threshold
            and confidence < self.min_confidence
        )

    def floor(self, stranger_share: float | None) -> ConfidenceFloor | None:
        """The minimum match confidence as a judge applies it to many queries at once (a fine-tune's
        closed-set evaluation), or None when this point has none."""
        if self.min_confidence is None or self.table is None:
            return None
        return ConfidenceFloor(self.table, self.table_size, self.min_confidence, stranger_share)

    def decide(self, similarity: float | None, confidence: float | None = None) -> IdentifyDecision:
        if similarity is None:
            return "unknown"
        if similarity >= self.threshold:
            return "uncertain" if self.held_back(similarity, confidence) else "match"
        if self.review_threshold is not None and similarity >= self.review_threshold:
            return "uncertain"
        return "unknown"


def served_threshold(
    card: ModelCard | None, image_counts: Mapping[int, int], target_fpir: float, default: float
) -> float:
    """The card's open-set threshold for the gallery (``image_counts``: images per individual ->
    individuals with that many) and the target FPIR, the threshold alone deciding; else its pair
    threshold, else ``default``. :func:`operating_point` may lower it for a minimum match confidence."""
    if card is not None and card.open_set is not None:
        return card.open_set.threshold(card.open_set.equivalent_size(image_counts), target_fpir)
    return effective_threshold(card, default, None)[0]


def lowered_for_floor(
    table: OpenSetCalibration,
    size: int,
    fpir: float,
    plain: float,
    review: float | None,
    floor: float,
    stranger_share: float | None,
) -> tuple[float, str]:
    """The match threshold when a match also needs a confidence of ``floor``, and what the reason
    adds. The floor holds back some strangers past the threshold too, so the card's thresholds for
    that floor are lower at the same target FPIR; the threshold is lowered to them only down to the
    review threshold, so that no answer that was ``unknown`` becomes ``uncertain``: only confident
    answers of the uncertain band become matches. Unchanged without a band, without thresholds for
    floors in the card, or for a share of strangers below the calibration's."""
    stored = table.floor_for(floor, stranger_share)
    if review is None or not stored:
        return plain, ""
    cut = min(plain, max(table.threshold(size, fpir, floor, stranger_share), review))
    if cut >= plain:
        return plain, ""
    return cut, (
        f"; lowered from {plain:.3f}, since the minimum match confidence ({stored:g} in the card's table) "
        "holds back some never-enrolled animals too"
    )


def raised_for_herd(card: ModelCard | None, fpir: float, plain: float) -> tuple[float, str] | None:
    """The match threshold raised by the card's herd check (:class:`HerdCalibration`) for ``fpir``
    over the table's ``plain`` one, and what the reason adds; None when the check found the table
    holding for this herd, did not report this target, or was never run."""
    row = card.herd.row_for(fpir) if card is not None and card.herd is not None else None
    if row is None or row.excess <= 0:
        return None
    assert card is not None and card.herd is not None
    cut = min(1.0, plain + row.excess)
    return cut, (
        f"; raised from {plain:.3f} by the herd check of {card.herd.checked_at} ({card.herd.individuals} "
        f"enrolled animals, each left out in turn: {row.past:.1%} of their photos reached the table's "
        f"threshold for {fpir:g}, so this herd is more alike than the animals the table was "
        f"calibrated on)"
    )


def gallery_images(image_counts: Mapping[int, int]) -> int:
    """The images of a gallery of ``image_counts`` (images per individual -> individuals with that many)."""
    return sum(n * k for n, k in image_counts.items())


def gallery_words(table: OpenSetCalibration, image_counts: Mapping[int, int]) -> str:
    """The gallery as the reason names it: its images and individuals, and the size the table reads
    it at when that differs (photos of one animal are alike: an animal with more photos than the
    calibration's counts as fewer images than it has)."""
    images = gallery_images(image_counts)
    individuals = sum(image_counts.values())
    words = f"a gallery of {images} images of {individuals} individuals"
    size = table.equivalent_size(image_counts)
    if size != images:
        words += (
            f", read as {size} images at the calibration's {table.images_per_individual:.1f} per individual"
        )
    return words


def beyond_validation(table: OpenSetCalibration, table_size: int) -> str:
    """What the reason says of a gallery larger than the calibration's validation data could simulate."""
    if not 0 < table.simulated_up_to < table_size:
        return ""
    larger = (
        f"; the gallery is larger than the {table.simulated_up_to} images its validation data could simulate"
    )
    if table.tail:
        return f"{larger}: the threshold extrapolates a tail fitted to their highest distractor scores"
    return f"{larger}, so the true FPIR is likely higher"


def operating_point(
    card: ModelCard | None,
    limits: Limits,
    species: str,
    image_counts: Mapping[int, int],
    requested: float | None,
) -> OperatingPoint:
    """The request's threshold; else the card's open-set threshold for this gallery (``image_counts``:
    images per individual -> individuals with that many) and the species' target FPIR (with an
    uncertain band down to the review FPIR's threshold, and above the threshold for a confidence below
    the species' minimum); else, for a card without that table, its pair threshold; else the
    configured default."""
    table = card.open_set if card is not None else None
    size = table.equivalent_size(image_counts) if table is not None else 0
    if requested is None and table is not None:
        fpir = limits.fpir_for(species)
        plain = served_threshold(card, image_counts, fpir, limits.default_threshold)
        review = table.threshold(size, limits.review_fpir) if limits.review_fpir > fpir else None
        review = review if review is not None and review < plain else None
        floor = limits.min_confidence_for(species)
        cut, lowered = lowered_for_floor(
            table, size, fpir, plain, review, floor, limits.stranger_share_for(species)
        )
        source: ThresholdSource = "open_set"
        herd = raised_for_herd(card, fpir, plain)
        if herd is not None and herd[0] > cut:
            cut, lowered, source = herd[0], herd[1], "herd_check"
        return OperatingPoint(
            threshold=cut,
            source=source,
            reason=f"threshold {cut:.3f} keeps never-enrolled animals answered match at {fpir:g} (target "
            f"FPIR) in {gallery_words(table, image_counts)}: the model card's open-set table, interpolated"
            + lowered
            + beyond_validation(table, size),
            review_threshold=review if review is not None and review < cut else None,
            target_fpir=fpir,
            table=table,
            table_size=size,
            min_confidence=floor if floor > 0 else None,
        )
    cut, source = effective_threshold(card, limits.default_threshold, requested)
    reasons = {
        "request": f"threshold {cut:.3f} given with the request",
        "model_card": f"the model card has no open-set table: its pair threshold {cut:.3f} (calibrated on "
        f"image pairs at FAR {card.threshold_far if card else None}) is used, which does not account for "
        "the gallery's size",
        "default": f"the model card has no calibrated threshold: the configured default {cut:.3f}",
    }
    return OperatingPoint(threshold=cut, source=source, reason=reasons[source], table=table, table_size=size)


class Stopwatch:
    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = (now - self.mark) * 1000.0
        self.mark = now

    def timings(self) -> Timings:
        return Timings(
            decode_ms=self.laps.get("decode", 0.0),
            embed_ms=self.laps.get("embed", 0.0),
            search_ms=self.laps.get("search", 0.0),
            total_ms=(time.perf_counter() - self.start) * 1000.0,
        )


def input_size(serving: Serving) -> tuple[int, int]:
    """The model input (height, width) that uploads are decoded toward."""
    return serving.embedder.card.preprocess.input_size


def embed_one(
    registry: Registry, serving: Serving, metrics: Metrics, species: str, decoded: DecodedImage
) -> np.ndarray:
    with metrics.time_inference(species, "embed"):
        return registry.embed(species, serving.embedder, [decoded.image])[0]


def identify(
    session: Session,
    registry: Registry,
    metrics: Metrics,
    limits: Limits,
    species: str,
    image: bytes,
    top_k: int | None,
    threshold: float | None,
    include_timings: bool,
    review_store: ImageStore | None = None,
) -> IdentifyResult:
    """``review_store``: keep an uncertain answer in the review queue, its photo in this store."""
    top_k = limits.default_top_k if top_k is None else top_k
    if top_k > limits.max_top_k:
        raise InvalidRequest(f"top_k must be at most {limits.max_top_k}", max_top_k=limits.max_top_k)
    serving = registry.serving(species)
    clock = Stopwatch()
    decoded = decode_image(image, limits.images, input_size(serving))
    clock.lap("decode")
    query = embed_one(registry, serving, metrics, species, decoded)
    clock.lap("embed")
    with metrics.search.labels(species).time():
        # the confidence needs the second individual too, whatever the answer lists
        found = registry.search(species, serving.gallery, query, max(top_k, 2))
        image_counts = serving.gallery.image_counts()
        gallery_size = gallery_images(image_counts)
    clock.lap("search")
    labels = _labels(session, [c.individual_id for c in found])
    candidates = [
        CandidatePublic(
            individual_id=c.individual_id,
            external_id=labels[c.individual_id][0] if labels is not None else None,
            name=labels[c.individual_id][1] if labels is not None else None,
            similarity=c.similarity,
            image_id=c.image_id,
        )
        for c in found
        if labels is None or c.individual_id in labels  # deleted between the search and this read
    ]
    point = operating_point(serving.embedder.card, limits, species, image_counts, threshold)
    top = candidates[0].similarity if candidates else None
    second = candidates[1].similarity if len(candidates) > 1 else None
    candidates = candidates[:top_k]
    confidence = None
    if point.table is not None and top is not None:
        share = limits.stranger_share_for(species)
        confidence = point.table.probability(top, point.table_size, second, share)
    decision = point.decide(top, confidence)
    reason = point.reason
    if point.held_back(top, confidence):
        reason += (
            f"; the best candidate passes it, but its confidence {confidence:.3f} is below the "
            f"{point.min_confidence:g} a match needs (minimum match confidence), so a person should look"
        )
    result = IdentifyResult(
        species=species,
        model_version=serving.model_version,
        decision=decision,
        threshold=point.threshold,
        threshold_source=point.source,
        best=candidates[0] if decision == "match" else None,
        candidates=candidates,
        gallery_size=gallery_size,
        timings=clock.timings() if include_timings else None,
        confidence=confidence,
        target_fpir=point.target_fpir,
        review_threshold=point.review_threshold,
        min_confidence=point.min_confidence,
        reason=reason,
        names_available=labels is not None,
    )
    # The queue lives in the database: an answer given while it is away is not kept.
    if decision == "uncertain" and review_store is not None and labels is not None:
        result.review_id = review.keep(session, review_store, decoded, result)
    return result


def _labels(
    session: Session, individual_ids: list[uuid.UUID]
) -> dict[uuid.UUID, tuple[str | None, str | None]] | None:
    """(external id, name) of each individual, or None while the database cannot be reached: the
    search ran on the in-memory index and its ids are still the answer."""
    try:
        labels = Repository(session).individual_labels(individual_ids)
        session.rollback()  # end the read now: the connection goes back to the pool before serialisation
    except UNAVAILABLE:
        session.rollback()
        return None
    return labels


@dataclass(frozen=True)
class Comparison:
    """A photo against a reference: another photo, or an individual's best-matching enrolled image."""

    serving: Serving  # the model both sides were embedded with
    image: DecodedImage
    reference: np.ndarray  # the vector the similarity was taken with
    similarity: float
    reference_image_id: uuid.UUID | None  # the individual's best-matching image; None for a photo
    compared: int  # images the photo was compared with
    clock: Stopwatch
    reference_photo: DecodedImage | None = None  # the reference photo, when one was given


def compare(
    session: Session,
    registry: Registry,
    metrics: Metrics,
    images: ImagePolicy,
    species: str,
    image: bytes,
    individual_id: uuid.UUID | None,
    reference_image: bytes | None,
    min_side: int = 0,
) -> Comparison:
    """The 1:1 comparison behind verify and explain: exactly one of ``individual_id`` (every image of
    it, the best one wins) and ``reference_image`` (both photos embedded in one batch). Images are
    decoded toward the model input, or toward ``min_side`` when that is larger (explain draws its
    overlay from the decoded photo)."""
    if (individual_id is None) == (reference_image is None):
        raise InvalidRequest("give exactly one of individual_id and reference_image")
    clock = Stopwatch()
    height, width = input_size(registry.serving(species))
    size = (max(height, min_side), max(width, min_side))
    if reference_image is not None:
        serving = registry.serving(species)
        decoded, other = decode_images([("image", image), ("reference_image", reference_image)], images, size)
        clock.lap("decode")
        with metrics.time_inference(species, "embed"):
            query, reference = registry.embed(species, serving.embedder, [decoded.image, other.image])
        clock.lap("embed")
        return Comparison(serving, decoded, reference, float(query @ reference), None, 1, clock, other)
    assert individual_id is not None
    decoded = decode_image(image, images, size)
    clock.lap("decode")
    serving, references = individual_references(session, registry, species, individual_id)
    query = embed_one(registry, serving, metrics, species, decoded)
    clock.lap("embed")
    scores = np.stack([vector for _, _, vector in references]) @ query
    best = int(np.argmax(scores))
    clock.lap("search")
    _, image_id, vector = references[best]
    return Comparison(serving, decoded, vector, float(scores[best]), image_id, len(references), clock)


def verify(
    session: Session,
    registry: Registry,
    metrics: Metrics,
    limits: Limits,
    species: str,
    image: bytes,
    individual_id: uuid.UUID | None,
    reference_image: bytes | None,
    threshold: float | None,
    include_timings: bool,
) -> VerifyResult:
    found = compare(session, registry, metrics, limits.images, species, image, individual_id, reference_image)
    cut, source = effective_threshold(found.serving.embedder.card, limits.default_threshold, threshold)
    return VerifyResult(
        species=species,
        model_version=found.serving.model_version,
        similarity=found.similarity,
        decision="match" if found.similarity >= cut else "unknown",
        threshold=cut,
        threshold_source=source,
        individual_id=individual_id,
        best_image_id=found.reference_image_id,
        compared_images=found.compared,
        timings=found.clock.timings() if include_timings else None,
    )


def individual_references(
    session: Session, registry: Registry, species: str, individual_id: uuid.UUID
) -> tuple[Serving, list[tuple[int, uuid.UUID, np.ndarray]]]:
    """The serving pair and the individual's vectors from its model: (embedding id, image id, vector).

    The query must be embedded with the returned pair's model, so both sides come from one version
    even when a re-embedded model is swapped in meanwhile.
    """
    repo = Repository(session)
    individual = repo.get_individual(individual_id)
    if individual is None:
        raise IndividualNotFound(f"no individual {individual_id}", individual_id=str(individual_id))
    owner = repo.species_by_id(individual.species_id)
    if owner is None or owner.name != species:
        raise SpeciesMismatch(
            f"individual {individual_id} is a {owner.name if owner else '?'}, not a {species}",
            individual_id=str(individual_id),
        )
    for _ in range(2):
        serving = registry.serving(species)
        references = repo.individual_embeddings(individual_id, serving.model_version_id)
        if references or not repo.images_of(individual_id):
            break
        session.rollback()  # a swap retired that version a moment ago: read again
    if not references:
        raise InvalidRequest(
            f"individual {individual_id} has no enrolled images to compare with",
            individual_id=str(individual_id),
        )
    return serving, references
