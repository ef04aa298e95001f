"""Queries of the review queue (``review_items``)."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import ReviewItem, Species


class ReviewRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, item: ReviewItem) -> ReviewItem:
        self.session.add(item)
        self.session.flush()
        return item

    def get(self, review_id: uuid.UUID, for_update: bool = False) -> tuple[ReviewItem, str] | None:
        """The item and its species' name."""
        query = (
            select(ReviewItem, Species.name)
            .join(Species, Species.id == ReviewItem.species_id)
            .where(ReviewItem.id == review_id)
        )
        if for_update:
            query = query.with_for_update(of=ReviewItem)
        row = self.session.execute(query).first()
        return None if row is None else (row[0], row[1])

    def list(
        self, species: str | None, status: str | None, offset: int, limit: int
    ) -> tuple[list[tuple[ReviewItem, str]], int]:
        """A page of items (oldest first) with their species' names, and the count of all that match."""
        query = select(ReviewItem, Species.name).join(Species, Species.id == ReviewItem.species_id)
        if species is not None:
            query = query.where(Species.name == species)
        if status is not None:
            query = query.where(ReviewItem.status == status)
        total = self.session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = self.session.execute(
            query.order_by(ReviewItem.created_at, ReviewItem.id).offset(offset).limit(limit)
        ).all()
        return [(row[0], row[1]) for row in rows], int(total)
