"""Queries, one method per question the services ask. No business rules, no commits."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Select, delete, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.db.models import (
    AuditEntry,
    Base,
    Embedding,
    Image,
    IndexChange,
    Individual,
    ModelVersion,
    ModelVersionStatus,
    Species,
)

VECTOR_DTYPE = np.dtype("<f4")
# Postgres NOTIFY channel of index changes; the payload is the species name.
INDEX_CHANNEL = "animalid_index_changes"
IN_LIST_CHUNK = 1000  # ids a query lists at most (SQLite caps its bound parameters)
GALLERY_COLUMNS = (Embedding.id, Embedding.image_id, Image.individual_id, Embedding.vector)  # a GalleryRow


def vector_to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def vector_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=VECTOR_DTYPE)


@dataclass(frozen=True)
class GalleryRow:
    embedding_id: int
    image_id: uuid.UUID
    individual_id: uuid.UUID
    vector: bytes


@dataclass(frozen=True)
class AuditFilter:
    action: str | None = None
    species: str | None = None
    individual_id: uuid.UUID | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class IndividualRow:
    individual: Individual
    species: str
    image_count: int


class Repository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # Species and model versions ---------------------------------------------------------------

    def species_by_name(self, name: str) -> Species | None:
        return self.session.scalar(select(Species).where(Species.name == name))

    def species_by_id(self, species_id: int) -> Species | None:
        return self.session.get(Species, species_id)

    def all_species(self) -> list[Species]:
        return list(self.session.scalars(select(Species).order_by(Species.name)))

    def insert_if_absent(self, model: type[Base], **values: Any) -> None:
        """Insert a row unless one with the same unique key exists, or is being inserted by another
        transaction (then this waits for it): processes registering the same species or model
        version at once (replicas starting, or reloading a new artifact together) do not fail."""
        insert = postgresql.insert if self.session.get_bind().dialect.name == "postgresql" else sqlite.insert
        self.session.execute(insert(model).values(**values).on_conflict_do_nothing())

    def ensure_species(self, name: str) -> Species:
        species = self.species_by_name(name)
        if species is None:
            self.insert_if_absent(Species, name=name)
            species = self.species_by_name(name)
            assert species is not None
        return species

    def model_version(self, species_id: int, version: str) -> ModelVersion | None:
        return self.session.scalar(
            select(ModelVersion).where(ModelVersion.species_id == species_id, ModelVersion.version == version)
        )

    def ensure_model_version(
        self,
        species_id: int,
        version: str,
        embedding_dim: int,
        preprocess_version: str,
        threshold: float | None,
        card: dict[str, Any],
    ) -> ModelVersion:
        row = self.model_version(species_id, version)
        if row is None:
            self.insert_if_absent(
                ModelVersion,
                species_id=species_id,
                version=version,
                status=ModelVersionStatus.PENDING,
                embedding_dim=embedding_dim,
                preprocess_version=preprocess_version,
                threshold=threshold,
                card=card,
            )
            row = self.model_version(species_id, version)
            assert row is not None
        return row

    def active_version(self, species_id: int) -> ModelVersion | None:
        return self.session.scalar(
            select(ModelVersion).where(
                ModelVersion.species_id == species_id, ModelVersion.status == ModelVersionStatus.ACTIVE
            )
        )

    def activate_version(self, species_id: int, model_version_id: int) -> int:
        """Make one version active, retire the others and drop their embeddings. Returns rows dropped."""
        others = select(ModelVersion.id).where(
            ModelVersion.species_id == species_id, ModelVersion.id != model_version_id
        )
        self.session.execute(
            update(ModelVersion)
            .where(ModelVersion.species_id == species_id, ModelVersion.id != model_version_id)
            .values(status=ModelVersionStatus.RETIRED)
            .execution_options(synchronize_session=False)
        )
        self.session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == model_version_id)
            .values(status=ModelVersionStatus.ACTIVE, activated_at=datetime.now(UTC))
            .execution_options(synchronize_session=False)
        )
        dropped = self.session.execute(
            delete(Embedding)
            .where(Embedding.model_version_id.in_(others))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(dropped, "rowcount", 0) or 0)

    # Individuals --------------------------------------------------------------------------------

    def get_individual(self, individual_id: uuid.UUID) -> Individual | None:
        return self.session.get(Individual, individual_id)

    def individual_by_external_id(self, species_id: int, external_id: str) -> Individual | None:
        return self.session.scalar(
            select(Individual).where(
                Individual.species_id == species_id, Individual.external_id == external_id
            )
        )

    def create_individual(
        self, species_id: int, external_id: str | None, name: str | None, metadata: dict[str, Any] | None
    ) -> Individual:
        individual = Individual(
            species_id=species_id, external_id=external_id, name=name, metadata_=metadata or {}
        )
        self.session.add(individual)
        self.session.flush()
        return individual

    def individual_labels(self, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, tuple[str | None, str | None]]:
        """(external_id, name) by id: the light lookup identify makes for its candidates."""
        id_list = list(ids)
        if not id_list:
            return {}
        rows = self.session.execute(
            select(Individual.id, Individual.external_id, Individual.name).where(Individual.id.in_(id_list))
        )
        return {row.id: (row.external_id, row.name) for row in rows}

    def image_counts(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
        if not ids:
            return {}
        rows = self.session.execute(
            select(Image.individual_id, func.count(Image.id))
            .where(Image.individual_id.in_(list(ids)))
            .group_by(Image.individual_id)
        )
        return {individual_id: int(count) for individual_id, count in rows}

    def _with_counts(self, rows: Sequence[Any]) -> list[IndividualRow]:
        counts = self.image_counts([individual.id for individual, _ in rows])
        return [
            IndividualRow(individual=individual, species=species, image_count=counts.get(individual.id, 0))
            for individual, species in rows
        ]

    def individual_row(self, individual_id: uuid.UUID) -> IndividualRow | None:
        query = (
            select(Individual, Species.name)
            .join(Species, Species.id == Individual.species_id)
            .where(Individual.id == individual_id)
        )
        rows = self._with_counts(list(self.session.execute(query).all()))
        return rows[0] if rows else None

    def lock_individuals(self, individual_ids: Sequence[uuid.UUID]) -> None:
        """Hold these animals' rows until commit or rollback (Postgres; SQLite has one writer).

        A delete, merge or photo delete takes them before it reads the photos it will change, so a
        write on another replica to the same animals, an enrol included (its photo's foreign key
        waits on the lock), runs wholly before or wholly after it; sorted, so that two merges of
        the same pair in opposite directions queue instead of deadlocking."""
        self.session.execute(
            select(Individual.id)
            .where(Individual.id.in_(list(individual_ids)))
            .order_by(Individual.id)
            .with_for_update()
        ).all()

    def list_individuals(
        self, species_id: int | None, external_id: str | None, offset: int, limit: int
    ) -> tuple[list[IndividualRow], int]:
        conditions = []
        if species_id is not None:
            conditions.append(Individual.species_id == species_id)
        if external_id is not None:
            conditions.append(Individual.external_id == external_id)
        total = self.session.scalar(select(func.count(Individual.id)).where(*conditions)) or 0
        query = (
            select(Individual, Species.name)
            .join(Species, Species.id == Individual.species_id)
            .where(*conditions)
            .order_by(Individual.created_at, Individual.id)
            .offset(offset)
            .limit(limit)
        )
        return self._with_counts(list(self.session.execute(query).all())), int(total)

    def delete_individual(self, individual: Individual) -> None:
        self.session.delete(individual)
        self.session.flush()

    # Images -------------------------------------------------------------------------------------

    def get_image(self, image_id: uuid.UUID) -> Image | None:
        return self.session.get(Image, image_id)

    def images_by_sha(self, individual_id: uuid.UUID, shas: Iterable[str]) -> dict[str, Image]:
        sha_list = list(set(shas))
        if not sha_list:
            return {}
        rows = self.session.scalars(
            select(Image).where(Image.individual_id == individual_id, Image.sha256.in_(sha_list))
        )
        return {row.sha256: row for row in rows}

    def storage_paths(self, image_ids: Sequence[uuid.UUID]) -> set[str]:
        """The storage paths of those of these images that have a row (by primary key)."""
        if not image_ids:
            return set()
        query = select(Image.storage_path).where(Image.id.in_(list(image_ids)))
        return set(self.session.scalars(query))

    def images_of(self, individual_id: uuid.UUID) -> list[Image]:
        return list(
            self.session.scalars(
                select(Image).where(Image.individual_id == individual_id).order_by(Image.created_at, Image.id)
            )
        )

    def list_images(self, individual_id: uuid.UUID, offset: int, limit: int) -> tuple[list[Image], int]:
        total = (
            self.session.scalar(select(func.count(Image.id)).where(Image.individual_id == individual_id)) or 0
        )
        rows = self.session.scalars(
            select(Image)
            .where(Image.individual_id == individual_id)
            .order_by(Image.created_at, Image.id)
            .offset(offset)
            .limit(limit)
        )
        return list(rows), int(total)

    def add_image(self, image: Image) -> Image:
        self.session.add(image)
        self.session.flush()
        return image

    def move_images(self, image_ids: Sequence[uuid.UUID], individual_id: uuid.UUID) -> None:
        if image_ids:
            self.session.execute(
                update(Image)
                .where(Image.id.in_(list(image_ids)))
                .values(individual_id=individual_id, updated_at=datetime.now(UTC))
                .execution_options(synchronize_session=False)
            )

    def delete_images(self, image_ids: Sequence[uuid.UUID]) -> None:
        if image_ids:
            self.session.execute(
                delete(Embedding)
                .where(Embedding.image_id.in_(list(image_ids)))
                .execution_options(synchronize_session=False)
            )
            self.session.execute(
                delete(Image)
                .where(Image.id.in_(list(image_ids)))
                .execution_options(synchronize_session=False)
            )

    def count_images(self, species_id: int) -> int:
        query = (
            select(func.count(Image.id))
            .join(Individual, Individual.id == Image.individual_id)
            .where(Individual.species_id == species_id)
        )
        return int(self.session.scalar(query) or 0)

    def count_individuals(self, species_id: int) -> int:
        return int(
            self.session.scalar(select(func.count(Individual.id)).where(Individual.species_id == species_id))
            or 0
        )

    def images_missing_version(self, species_id: int, model_version_id: int, limit: int) -> list[Image]:
        """Images of a species with no embedding from the given model version, oldest first."""
        has_embedding = (
            select(Embedding.id)
            .where(Embedding.image_id == Image.id, Embedding.model_version_id == model_version_id)
            .exists()
        )
        query = (
            select(Image)
            .join(Individual, Individual.id == Image.individual_id)
            .where(Individual.species_id == species_id, ~has_embedding)
            .order_by(Image.created_at, Image.id)
            .limit(limit)
        )
        return list(self.session.scalars(query))

    # Embeddings ---------------------------------------------------------------------------------

    def add_embedding(self, image_id: uuid.UUID, model_version_id: int, vector: np.ndarray) -> Embedding:
        row = Embedding(image_id=image_id, model_version_id=model_version_id, vector=vector_to_bytes(vector))
        self.session.add(row)
        self.session.flush()
        return row

    def embedding_ids(self, image_ids: Sequence[uuid.UUID], model_version_id: int) -> dict[uuid.UUID, int]:
        if not image_ids:
            return {}
        rows = self.session.execute(
            select(Embedding.image_id, Embedding.id).where(
                Embedding.image_id.in_(list(image_ids)), Embedding.model_version_id == model_version_id
            )
        )
        return {image_id: int(emb_id) for image_id, emb_id in rows}

    def individual_embeddings(
        self, individual_id: uuid.UUID, model_version_id: int
    ) -> list[tuple[int, uuid.UUID, np.ndarray]]:
        rows = self.session.execute(
            select(Embedding.id, Embedding.image_id, Embedding.vector)
            .join(Image, Image.id == Embedding.image_id)
            .where(Image.individual_id == individual_id, Embedding.model_version_id == model_version_id)
            .order_by(Embedding.id)
        )
        return [(int(eid), image_id, vector_from_bytes(vec)) for eid, image_id, vec in rows]

    def count_embeddings(self, model_version_id: int) -> int:
        return int(
            self.session.scalar(
                select(func.count(Embedding.id)).where(Embedding.model_version_id == model_version_id)
            )
            or 0
        )

    def iter_gallery(self, model_version_id: int, chunk: int = 10_000) -> Iterator[list[GalleryRow]]:
        """Every embedding of a model version with its image and individual, in id order."""
        query = self._gallery_query(GALLERY_COLUMNS, model_version_id).execution_options(yield_per=chunk)
        for part in self.session.execute(query).partitions(chunk):
            yield [GalleryRow(int(eid), image_id, ind_id, vec) for eid, image_id, ind_id, vec in part]

    def iter_gallery_owners(
        self, model_version_id: int, chunk: int = 50_000
    ) -> Iterator[list[tuple[int, uuid.UUID]]]:
        """(embedding id, individual id) of every embedding of a model version, in id order: the
        gallery's layout without its vectors."""
        query = self._gallery_query((Embedding.id, Image.individual_id), model_version_id)
        for part in self.session.execute(query.execution_options(yield_per=chunk)).partitions(chunk):
            yield [(int(eid), ind_id) for eid, ind_id in part]

    def gallery_rows(self, embedding_ids: Iterable[int], model_version_id: int) -> list[GalleryRow]:
        """The embeddings among ``embedding_ids`` that exist in ``model_version_id``, with their image
        and individual (a replica reconciling its index after a change)."""
        ids = sorted({int(i) for i in embedding_ids})
        rows = []
        for start in range(0, len(ids), IN_LIST_CHUNK):
            query = self._gallery_query(GALLERY_COLUMNS, model_version_id).where(
                Embedding.id.in_(ids[start : start + IN_LIST_CHUNK])
            )
            rows += [
                GalleryRow(int(eid), image_id, ind_id, vec)
                for eid, image_id, ind_id, vec in self.session.execute(query)
            ]
        return rows

    @staticmethod
    def _gallery_query(columns: tuple[Any, ...], model_version_id: int) -> Select[*tuple[Any, ...]]:
        """``columns`` of a model version's embeddings joined to their images, in embedding id order."""
        return (
            select(*columns)
            .join(Image, Image.id == Embedding.image_id)
            .where(Embedding.model_version_id == model_version_id)
            .order_by(Embedding.id)
        )

    # Index change log ---------------------------------------------------------------------------

    def record_index_change(self, species: str, embedding_ids: Iterable[int]) -> None:
        """On Postgres, log a change to these vectors in the current transaction and NOTIFY the
        other processes (delivered only if and when the transaction commits)."""
        ids = sorted({int(i) for i in embedding_ids})
        if not ids or self.session.get_bind().dialect.name != "postgresql":
            return  # SQLite serves from one process: nobody else follows
        self.session.add(IndexChange(species=species, embedding_ids=ids))
        self.session.execute(
            text("SELECT pg_notify(:channel, :species)"), {"channel": INDEX_CHANNEL, "species": species}
        )

    def record_model_switch(self, species: str) -> None:
        """On Postgres, log (and NOTIFY) that a new model version of ``species`` is now active."""
        if self.session.get_bind().dialect.name != "postgresql":
            return
        self.session.add(IndexChange(species=species, kind="model", embedding_ids=[]))
        self.session.execute(
            text("SELECT pg_notify(:channel, :species)"), {"channel": INDEX_CHANNEL, "species": species}
        )

    def prune_index_changes(self, before: datetime) -> int:
        """Forget changes logged before ``before``; every process has applied them long since."""
        pruned = self.session.execute(delete(IndexChange).where(IndexChange.created_at < before))
        return int(getattr(pruned, "rowcount", 0) or 0)

    def last_index_change(self) -> int:
        """The highest change sequence number so far, 0 when none."""
        return int(self.session.scalar(select(func.coalesce(func.max(IndexChange.seq), 0))) or 0)

    def index_changes(self, after: int, also: Iterable[int] = (), limit: int = 1000) -> list[IndexChange]:
        """Changes with ``seq > after``, plus those numbered in ``also`` (gaps seen earlier: a
        transaction that took its number before a later one but committed after it)."""
        condition = IndexChange.seq > after
        extra = sorted(set(also))
        if extra:
            condition = or_(condition, IndexChange.seq.in_(extra))
        return list(
            self.session.scalars(select(IndexChange).where(condition).order_by(IndexChange.seq).limit(limit))
        )

    # Audit log ----------------------------------------------------------------------------------

    def audit(
        self, action: str, species: str, actor: str, individual_id: uuid.UUID | None, details: dict[str, Any]
    ) -> None:
        self.session.add(
            AuditEntry(
                action=action, species=species, individual_id=individual_id, actor=actor, details=details
            )
        )

    def audit_page(self, filters: AuditFilter, offset: int, limit: int) -> tuple[list[AuditEntry], int]:
        """Entries matching every given filter, newest first, and how many match in all."""
        conditions: list[Any] = []
        if filters.action is not None:
            conditions.append(AuditEntry.action == filters.action)
        if filters.species is not None:
            conditions.append(AuditEntry.species == filters.species)
        if filters.individual_id is not None:
            conditions.append(AuditEntry.individual_id == filters.individual_id)
        if filters.actor is not None:
            conditions.append(AuditEntry.actor == filters.actor)
        if filters.since is not None:
            conditions.append(AuditEntry.created_at >= filters.since)
        if filters.until is not None:
            conditions.append(AuditEntry.created_at < filters.until)
        total = self.session.scalar(select(func.count(AuditEntry.id)).where(*conditions)) or 0
        rows = self.session.scalars(
            select(AuditEntry).where(*conditions).order_by(AuditEntry.id.desc()).offset(offset).limit(limit)
        )
        return list(rows), int(total)

    def audit_entries(self, individual_id: uuid.UUID | None = None) -> list[AuditEntry]:
        query = select(AuditEntry).order_by(AuditEntry.id)
        if individual_id is not None:
            query = query.where(AuditEntry.individual_id == individual_id)
        return list(self.session.scalars(query))
