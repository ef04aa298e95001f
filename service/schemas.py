"""Pydantic schemas of the REST API: what comes in and what goes out. ORM models live apart."""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

# Values the database cannot store are refused here, as validation errors, not as a 500 from the
# driver: Postgres text cannot hold NUL, JSONB cannot hold NaN, Infinity or \u0000, and neither
# can hold an unpaired surrogate (SQLite would quietly turn NaN into null).
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def _valid_unicode(value: str) -> None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PydanticCustomError("string_unicode", "strings must be valid Unicode") from exc


def _no_control_characters(value: str) -> str:
    if _CONTROL_CHARACTERS.search(value):
        raise PydanticCustomError(
            "control_character", "control characters (U+0000 to U+001F, U+007F) are not allowed"
        )
    _valid_unicode(value)
    return value


def _storable_string(value: str) -> None:
    if "\x00" in value:
        raise PydanticCustomError("control_character", "NUL (U+0000) cannot be stored in metadata")
    _valid_unicode(value)


MAX_METADATA_DEPTH = 32


def _storable_json(value: dict[str, Any]) -> dict[str, Any]:
    """Every key and value, iteratively, at most ``MAX_METADATA_DEPTH`` levels deep (deeper nesting
    would reach recursion limits when the answer is serialised)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict | list) and depth > MAX_METADATA_DEPTH:
            raise PydanticCustomError(
                "too_deep", "metadata may nest at most {depth} levels", {"depth": MAX_METADATA_DEPTH}
            )
        if isinstance(node, dict):
            for key in node:
                _storable_string(key)
            pending.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            pending.extend((child, depth + 1) for child in node)
        elif isinstance(node, str):
            _storable_string(node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise PydanticCustomError(
                "non_finite_number", "NaN and Infinity cannot be stored in metadata; use null or a string"
            )
    return value


PlainText = Annotated[str, AfterValidator(_no_control_characters)]
"""A one-line string without control characters (names, ids)."""
Metadata = Annotated[dict[str, Any], AfterValidator(_storable_json)]
"""A JSON object the database can store: finite numbers, no NUL, valid Unicode."""


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise PydanticCustomError(
            "time_out_of_range", "the time falls outside the years 1 to 9999 in UTC"
        ) from None


UtcTime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
"""A time with its offset, as the UTC instant the database compares (0001-01-01T00:00+01:00 is
refused: it is in the year 0 in UTC)."""

SpeciesName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", examples=["dog"])
]
ExternalId = Annotated[PlainText, Field(min_length=1, max_length=255, examples=["farm-42/cow-0017"])]
Name = Annotated[PlainText, Field(max_length=255)]
Threshold = Annotated[
    float,
    Field(
        ge=-1.0,
        le=1.0,
        description="Cosine-similarity cut-off for a match; defaults to the model card's calibrated value",
        examples=[0.42],
    ),
]
Decision = Literal["match", "unknown"]
IdentifyDecision = Literal["match", "uncertain", "unknown"]
# open_set: the model card's table for the gallery's size and the configured target FPIR;
# herd_check: that threshold raised by the card's herd check (the enrolled animals more alike than
# the table's); model_card: its pair threshold (cards without that table)
ThresholdSource = Literal["request", "open_set", "herd_check", "model_card", "default"]

EXAMPLE_UUID = "0b6f5a3e-8a55-4c44-9d1d-0e9a5f3c2b71"
EXAMPLE_IMAGE_UUID = "5d2c1b7e-3f4a-4e8b-a1c9-7b6d5e4f3a21"
EXAMPLE_SOURCE_UUID = "9a4e2c6b-1d3f-4b5a-8c7e-2f1a0b9c8d7e"
EXAMPLE_TS = "2026-11-23T10:15:00Z"
B64_EXAMPLE = "/9j/4AAQSkZJRgABAQAAAQABAAD..."


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class ErrorBody(BaseModel):
    model_config = _examples(
        {"code": "species_not_found", "message": "unknown species 'wolf'", "details": {"species": "wolf"}}
    )
    code: str = Field(description="Stable machine-readable error code")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class Timings(BaseModel):
    decode_ms: float
    embed_ms: float
    search_ms: float = 0.0
    total_ms: float


# Individuals and images --------------------------------------------------------------------------


INDIVIDUAL_EXAMPLE = {
    "id": EXAMPLE_UUID,
    "species": "dog",
    "external_id": "kennel-7/rex",
    "name": "Rex",
    "metadata": {"breed": "beagle"},
    "image_count": 4,
    "created_at": EXAMPLE_TS,
    "updated_at": EXAMPLE_TS,
}


class IndividualPublic(BaseModel):
    model_config = _examples(INDIVIDUAL_EXAMPLE)
    id: uuid.UUID
    species: str
    external_id: str | None
    name: str | None
    metadata: dict[str, Any]
    image_count: int
    created_at: datetime
    updated_at: datetime


class IndividualsPublic(BaseModel):
    model_config = _examples({"data": [INDIVIDUAL_EXAMPLE], "count": 1, "offset": 0, "limit": 50})
    data: list[IndividualPublic]
    count: int = Field(description="Individuals matching the filters, all pages together")
    offset: int
    limit: int


class IndividualUpdate(BaseModel):
    """Fields present in the body are set; absent ones are left alone. ``metadata`` is replaced whole.
    At least one field: an empty body is refused (422 invalid_request), as the schema says."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "Rex", "metadata": {"breed": "beagle"}}],
            "minProperties": 1,
        },
    )
    name: Name | None = None
    metadata: Metadata | None = None


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"source_id": EXAMPLE_UUID}]})
    source_id: uuid.UUID = Field(description="The individual merged into the one in the path, then deleted")


class MergeResult(BaseModel):
    model_config = _examples(
        {
            "individual": INDIVIDUAL_EXAMPLE,
            "source_id": EXAMPLE_SOURCE_UUID,
            "moved_images": 3,
            "duplicate_images_dropped": 1,
        }
    )
    individual: IndividualPublic
    source_id: uuid.UUID
    moved_images: int
    duplicate_images_dropped: int


class DeleteResult(BaseModel):
    model_config = _examples({"id": EXAMPLE_UUID, "deleted_images": 4})
    id: uuid.UUID
    deleted_images: int


IMAGE_EXAMPLE = {
    "id": EXAMPLE_IMAGE_UUID,
    "individual_id": EXAMPLE_UUID,
    "sha256": "9f2b" + "0" * 60,
    "size_bytes": 18234,
    "width": 224,
    "height": 224,
    "format": "JPEG",
    "created_at": EXAMPLE_TS,
}


class ImagePublic(BaseModel):
    model_config = _examples(IMAGE_EXAMPLE)
    id: uuid.UUID
    individual_id: uuid.UUID
    sha256: str
    size_bytes: int
    width: int
    height: int
    format: str
    created_at: datetime


class ImagesPublic(BaseModel):
    model_config = _examples({"data": [IMAGE_EXAMPLE], "count": 1, "offset": 0, "limit": 50})
    data: list[ImagePublic]
    count: int
    offset: int
    limit: int


# Enroll --------------------------------------------------------------------------------------------


class EnrollFields(BaseModel):
    """Who the images show. Give ``individual_id`` (existing) or ``external_id`` (found or created)."""

    model_config = ConfigDict(extra="forbid")
    species: SpeciesName
    individual_id: uuid.UUID | None = Field(default=None, description="An existing individual")
    external_id: ExternalId | None = Field(
        default=None, description="Your id; the individual is created on first use (unique within a species)"
    )
    name: Name | None = Field(default=None, description="Used when the individual is created")
    metadata: Metadata | None = Field(
        default=None,
        description="JSON object stored when the individual is created (multipart: a JSON string)",
    )


class EnrollJSON(EnrollFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"species": "dog", "external_id": "kennel-7/rex", "name": "Rex", "images": [B64_EXAMPLE]}
            ]
        },
    )
    images: list[str] = Field(min_length=1, description="Base64 images (or data: URLs)")


class EnrolledImage(BaseModel):
    image_id: uuid.UUID
    sha256: str
    created: bool = Field(description="False when this individual already had this exact image (idempotent)")
    width: int
    height: int


class EnrollResult(BaseModel):
    model_config = _examples(
        {
            "individual": INDIVIDUAL_EXAMPLE,
            "individual_created": True,
            "images": [
                {
                    "image_id": EXAMPLE_IMAGE_UUID,
                    "sha256": "9f2b" + "0" * 60,
                    "created": True,
                    "width": 224,
                    "height": 224,
                }
            ],
            "model_version": "dog-3f6c2a9d81b0",
        }
    )
    individual: IndividualPublic
    individual_created: bool
    images: list[EnrolledImage]
    model_version: str


# Identify ------------------------------------------------------------------------------------------


class IdentifyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    species: SpeciesName
    top_k: int | None = Field(
        default=None, ge=1, description="Individuals to return, each once (default: ANIMALID_DEFAULT_TOP_K)"
    )
    threshold: Threshold | None = None
    include_timings: bool = False


class IdentifyJSON(IdentifyFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"species": "dog", "image": B64_EXAMPLE, "top_k": 5}]},
    )
    image: str = Field(description="Base64 image (or a data: URL)")


class CandidatePublic(BaseModel):
    individual_id: uuid.UUID
    external_id: str | None
    name: str | None
    similarity: float = Field(description="Cosine similarity of the best-matching image of this individual")
    image_id: uuid.UUID = Field(description="That best-matching enrolled image")


class IdentifyResult(BaseModel):
    model_config = _examples(
        {
            "species": "dog",
            "model_version": "dog-3f6c2a9d81b0",
            "decision": "match",
            "threshold": 0.42,
            "threshold_source": "model_card",
            "best": {
                "individual_id": EXAMPLE_UUID,
                "external_id": "kennel-7/rex",
                "name": "Rex",
                "similarity": 0.81,
                "image_id": EXAMPLE_IMAGE_UUID,
            },
            "candidates": [
                {
                    "individual_id": EXAMPLE_UUID,
                    "external_id": "kennel-7/rex",
                    "name": "Rex",
                    "similarity": 0.81,
                    "image_id": EXAMPLE_IMAGE_UUID,
                }
            ],
            "gallery_size": 1250,
            "timings": None,
        }
    )
    species: str
    model_version: str
    decision: IdentifyDecision = Field(
        description="match when the best candidate reaches the threshold (and its confidence the minimum "
        "a match needs, when one is configured); uncertain when it only reaches the review threshold, or "
        "reaches the threshold with a lower confidence (a person should look); else unknown"
    )
    threshold: float
    threshold_source: ThresholdSource
    best: CandidatePublic | None = Field(
        description="The matched individual; null unless the decision is match"
    )
    candidates: list[CandidatePublic] = Field(description="Up to top_k individuals, best first, no repeats")
    gallery_size: int = Field(description="Enrolled images searched")
    timings: Timings | None = None
    confidence: float | None = Field(
        default=None,
        description="Calibrated probability that the best candidate is the right animal, from its "
        "similarity, its margin over the second individual and the gallery's size (fitted on validation "
        "individuals), for the configured share of queries of animals not enrolled (ANIMALID_STRANGER_SHARE; "
        "default: the model card's calibration mix); null when the model card has no open-set table",
    )
    target_fpir: float | None = Field(
        default=None, description="Share of never-enrolled animals the threshold lets through as match"
    )
    review_threshold: float | None = Field(
        default=None, description="Lower edge of the uncertain band; null when there is none"
    )
    min_confidence: float | None = Field(
        default=None,
        description="The confidence a match needs (ANIMALID_MIN_MATCH_CONFIDENCE); below it a best candidate "
        "past the threshold is uncertain; null when none applies (none configured, or a requested threshold)",
    )
    reason: str = Field(
        default="",
        description="Why this threshold (its source, in words), and whether the minimum match confidence "
        "held a candidate past it back",
    )
    review_id: uuid.UUID | None = Field(
        default=None,
        description="The review-queue item kept for an uncertain answer (when ANIMALID_REVIEW_QUEUE is on)",
    )
    names_available: bool = Field(
        default=True,
        description="false while the database cannot be reached: the search ran on the in-memory index, "
        "candidates carry their ids and external_id and name are null",
    )


# Verify --------------------------------------------------------------------------------------------


class ImagePairJSON(BaseModel):
    """The base64 images of a JSON verify or explain request: the query and an optional reference."""

    image: str = Field(description="Base64 image")
    reference_image: str | None = Field(default=None, description="Base64 image to compare with")


class VerifyFields(BaseModel):
    """Compare ``image`` with an enrolled individual (all its images) or with ``reference_image``."""

    model_config = ConfigDict(extra="forbid")
    species: SpeciesName
    individual_id: uuid.UUID | None = None
    threshold: Threshold | None = None
    include_timings: bool = False


class VerifyJSON(ImagePairJSON, VerifyFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"species": "dog", "image": B64_EXAMPLE, "individual_id": EXAMPLE_UUID}]
        },
    )


class VerifyResult(BaseModel):
    model_config = _examples(
        {
            "species": "dog",
            "model_version": "dog-3f6c2a9d81b0",
            "similarity": 0.77,
            "decision": "match",
            "threshold": 0.42,
            "threshold_source": "model_card",
            "individual_id": EXAMPLE_UUID,
            "best_image_id": EXAMPLE_IMAGE_UUID,
            "compared_images": 4,
            "timings": None,
        }
    )
    species: str
    model_version: str
    similarity: float = Field(description="Against an individual: the maximum over its images")
    decision: Decision
    threshold: float
    threshold_source: ThresholdSource
    individual_id: uuid.UUID | None = None
    best_image_id: uuid.UUID | None = None
    compared_images: int
    timings: Timings | None = None


# Explain -------------------------------------------------------------------------------------------


class ExplainFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    species: SpeciesName
    individual_id: uuid.UUID | None = Field(
        default=None, description="Explain the match with this individual's best-matching image"
    )


class ExplainJSON(ImagePairJSON, ExplainFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"species": "dog", "image": B64_EXAMPLE, "individual_id": EXAMPLE_UUID}]
        },
    )


class ExplainResult(BaseModel):
    model_config = _examples(
        {
            "species": "dog",
            "model_version": "dog-3f6c2a9d81b0",
            "similarity": 0.77,
            "individual_id": EXAMPLE_UUID,
            "reference_image_id": EXAMPLE_IMAGE_UUID,
            "height": 2,
            "width": 2,
            "heatmap": [[0.0, 0.4], [0.9, 1.0]],
            "reference_heatmap": [[0.1, 0.8], [0.3, 1.0]],
            "overlay_png": "iVBORw0KGgo...",
        }
    )
    species: str
    model_version: str
    similarity: float
    individual_id: uuid.UUID | None
    reference_image_id: uuid.UUID | None
    height: int = Field(description="Rows of the heatmap (the model's input height)")
    width: int
    heatmap: list[list[float]] = Field(
        description="The query's map in [0, 1], row-major, model input resolution: each pixel's positive "
        "share (gradient x input) of the query's similarity to the reference, unblurred"
    )
    reference_heatmap: list[list[float]] = Field(
        description="The reference photo's map, the same way: what in it raises its similarity to the query"
    )
    overlay_png: str = Field(
        description="Base64 PNG: the query and the reference side by side, each with its heat map, "
        "the similarity, the reference's individual and a colour key"
    )


# Species, health -----------------------------------------------------------------------------------


SPECIES_EXAMPLE = {
    "name": "dog",
    "status": "ready",
    "reason": None,
    "model_version": "dog-3f6c2a9d81b0",
    "pending_model_version": None,
    "reembedding": None,
    "embedding_dim": 512,
    "architecture": "resnet18-gap-linear-bn",
    "input_size": [112, 112],
    "preprocessing_version": "1",
    "threshold": 0.42,
    "threshold_source": "model_card",
    "threshold_far": 0.01,
    "identify": {
        "threshold": 0.731,
        "threshold_source": "open_set",
        "target_fpir": 0.01,
        "review_threshold": 0.664,
        "min_confidence": 0.5,
        "gallery_images": 1250,
        "expected_tpir": 0.47,
        "reason": "threshold 0.731 keeps never-enrolled animals answered match at 0.01 (target FPIR) in a "
        "gallery of 1250 images of 310 individuals: the model card's open-set table, interpolated",
    },
    "metrics": {"top1": 0.91},
    "device": "cpu",
    "index_on_gpu": False,
    "index_size": 1250,
    "individuals": 310,
    "images": 1250,
}


class IdentifyPoint(BaseModel):
    """How ``/identify`` decides for a species now, for a request that gives no threshold."""

    threshold: float = Field(description="The match threshold for the gallery as it is now")
    threshold_source: ThresholdSource
    target_fpir: float | None = Field(
        description="Share of never-enrolled animals the threshold lets through as match (open-set table)"
    )
    review_threshold: float | None = Field(description="Lower edge of the uncertain band; null when none")
    min_confidence: float | None = Field(
        description="The confidence a match needs (ANIMALID_MIN_MATCH_CONFIDENCE); null when none applies"
    )
    gallery_images: int = Field(description="Enrolled images the threshold is set for")
    expected_tpir: float | None = Field(
        description="The model card's estimate, from its validation animals, of the share of an enrolled "
        "animal's photos answered match and right at this threshold (before the minimum confidence)"
    )
    reason: str = Field(description="Why this threshold, in words, as /identify gives it")


class SpeciesPublic(BaseModel):
    model_config = _examples(SPECIES_EXAMPLE)
    name: str
    status: Literal["ready", "reindexing", "building", "disabled"]
    reason: str | None = Field(description="Why the species is not fully ready")
    model_version: str | None
    pending_model_version: str | None = Field(
        description="A new model re-embedding the gallery in the background"
    )
    reembedding: dict[str, int] | None = Field(description="Progress of that re-embedding: done, total")
    embedding_dim: int | None
    architecture: str | None = Field(
        default=None, description="The serving model's backbone and neck: <backbone>-gap-<neck>"
    )
    input_size: list[int] | None
    preprocessing_version: str | None
    threshold: float | None = Field(
        description="The model card's pair threshold (image against image, at threshold_far); /identify "
        "decides with `identify`, set for the gallery's size"
    )
    threshold_source: ThresholdSource | None
    threshold_far: float | None
    identify: IdentifyPoint | None = Field(
        default=None, description="How /identify decides now; null until the species serves a model"
    )
    herd_check: dict[str, Any] | None = Field(
        default=None,
        description="The serving card's herd check (POST /species/{name}/herd-check): when, the gallery "
        "checked, and per target FPIR the share of the enrolled animals' photos, each animal left out, "
        "past the table's threshold and the threshold holding the target; null until one is kept",
    )
    metrics: dict[str, Any] = Field(
        description="Evaluation metrics from the model card; a release model (trained on its test animals "
        "too) has no test figures of its own, and `study_split` holds those of the same recipe trained "
        "without them"
    )
    trained_for: str | None = Field(
        default=None, description="The species the model was trained for, when its card was relabelled"
    )
    device: str | None
    index_on_gpu: bool | None
    index_size: int | None
    individuals: int
    images: int


class SpeciesList(BaseModel):
    model_config = _examples({"data": [SPECIES_EXAMPLE]})
    data: list[SpeciesPublic]


class ReloadResult(BaseModel):
    model_config = _examples(
        {
            "species": "dog",
            "status": "reindexing",
            "model_version": "dog-3f6c2a9d81b0",
            "pending_model_version": "dog-77a1e0c4d2f9",
            "message": "re-embedding 1250 images in the background; the current model serves meanwhile",
        }
    )
    species: str
    status: str
    model_version: str | None
    pending_model_version: str | None
    message: str


class HealthResult(BaseModel):
    model_config = _examples({"status": "ok"})
    status: Literal["ok"]


class SpeciesReadiness(BaseModel):
    name: str
    status: str
    reason: str | None
    detail: str | None = Field(default=None, description="The error behind the reason (admin status only)")
    index_size: int | None
    database_embeddings: int | None
    database_images: int | None
    consistent: bool


CheckName = Literal["database", "models", "indexes"]


class ReadyResult(BaseModel):
    """The open readiness probe: up or down, and which check failed; never why."""

    model_config = _examples(
        {"ready": False, "checks": {"database": "down", "models": "up", "indexes": "up"}},
    )
    ready: bool
    checks: dict[CheckName, Literal["up", "down"]] = Field(
        description="database: it answers; models: some species serves and none waits for its first "
        "index; indexes: every serving index holds exactly the database's vectors"
    )


class StatusResult(BaseModel):
    """What the readiness probe found, with the errors behind it (admin scope)."""

    model_config = _examples(
        {
            "ready": True,
            "checks": {"database": "up", "models": "up", "indexes": "up"},
            "database": {"ok": True, "error": None},
            "species": [
                {
                    "name": "dog",
                    "status": "ready",
                    "reason": None,
                    "detail": None,
                    "index_size": 1250,
                    "database_embeddings": 1250,
                    "database_images": 1250,
                    "consistent": True,
                }
            ],
        }
    )
    ready: bool
    checks: dict[CheckName, Literal["up", "down"]]
    database: dict[str, Any]
    species: list[SpeciesReadiness]

    def probe(self) -> ReadyResult:
        return ReadyResult(ready=self.ready, checks=self.checks)


# Review queue ---------------------------------------------------------------------------------------

ReviewStatusName = Literal["pending", "confirmed", "new_individual", "rejected"]


REVIEW_EXAMPLE = {
    "id": EXAMPLE_SOURCE_UUID,
    "species": "dog",
    "status": "pending",
    "model_version": "dog-3f6c2a9d81b0",
    "candidates": [
        {
            "individual_id": EXAMPLE_UUID,
            "external_id": "kennel-7/rex",
            "name": "Rex",
            "similarity": 0.66,
            "image_id": EXAMPLE_IMAGE_UUID,
        }
    ],
    "similarity": 0.66,
    "confidence": 0.41,
    "threshold": 0.70,
    "gallery_size": 1250,
    "image_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "created_at": EXAMPLE_TS,
    "resolved_at": None,
    "resolved_by": None,
    "individual_id": None,
    "image_id": None,
}


class ReviewItemPublic(BaseModel):
    model_config = _examples(REVIEW_EXAMPLE)
    id: uuid.UUID
    species: str
    status: ReviewStatusName
    model_version: str
    candidates: list[CandidatePublic] = Field(description="The identify answer's candidates, best first")
    similarity: float = Field(description="Similarity of the best candidate")
    confidence: float | None
    threshold: float = Field(description="The match threshold the answer was held against")
    gallery_size: int
    image_sha256: str
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None = Field(description="Fingerprint of the admin key that resolved it")
    individual_id: uuid.UUID | None = Field(description="Whom the photo was enrolled to, once resolved")
    image_id: uuid.UUID | None = Field(description="The enrolled image, once resolved")


class ReviewItemsPublic(BaseModel):
    model_config = _examples({"data": [REVIEW_EXAMPLE], "count": 1, "offset": 0, "limit": 50})
    data: list[ReviewItemPublic]
    count: int = Field(description="Items matching the filters, all pages together")
    offset: int
    limit: int


class ReviewResolve(BaseModel):
    """confirm: the photo shows ``individual_id`` (it is enrolled to it); new_individual: an animal
    not enrolled yet (created with ``external_id`` and ``name``, the photo enrolled); reject: neither
    (nothing is enrolled)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"action": "confirm", "individual_id": EXAMPLE_UUID}]},
    )
    action: Literal["confirm", "new_individual", "reject"]
    individual_id: uuid.UUID | None = None
    external_id: ExternalId | None = None
    name: Name | None = None


# Audit log -----------------------------------------------------------------------------------------


AUDIT_EXAMPLE = {
    "id": 812,
    "action": "merge",
    "species": "dog",
    "individual_id": EXAMPLE_UUID,
    "actor": "3f1c2e4a9b7d",
    "details": {"source_id": EXAMPLE_SOURCE_UUID, "moved_images": [EXAMPLE_IMAGE_UUID]},
    "created_at": EXAMPLE_TS,
}


class AuditEntryPublic(BaseModel):
    model_config = _examples(AUDIT_EXAMPLE)
    id: int
    action: str = Field(
        description="enroll, update, delete_individual, delete_image, merge, reload, or auth_refused "
        "(a 401 or 403)"
    )
    species: str | None = Field(description="null for entries that concern no species (auth_refused)")
    individual_id: uuid.UUID | None
    actor: str = Field(
        description="Fingerprint of the API key (first 12 hex digits of its SHA-256), auth-disabled, "
        "demo, or unauthenticated"
    )
    details: dict[str, Any]
    created_at: datetime


class AuditPage(BaseModel):
    model_config = _examples({"data": [AUDIT_EXAMPLE], "count": 1, "offset": 0, "limit": 50})
    data: list[AuditEntryPublic] = Field(description="Newest first")
    count: int = Field(description="Entries matching the filters, all pages together")
    offset: int
    limit: int
