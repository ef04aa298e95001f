"""Review queue: identify answers marked uncertain, kept for a person to decide.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the column type at this revision (migrations never import the live models).
JsonDoc = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "review_items",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("species_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("storage_path", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("candidates", JsonDoc, nullable=False),
        sa.Column("similarity", sa.Float(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("gallery_size", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("resolved_at", nullable=True),
        sa.Column("resolved_by", sa.String(length=64), nullable=True),
        sa.Column("individual_id", sa.Uuid(), nullable=True),
        sa.Column("image_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["species_id"], ["species.id"], name=op.f("fk_review_items_species_id_species"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_items")),
    )
    op.create_index(op.f("ix_review_items_species_id"), "review_items", ["species_id"])
    op.create_index(op.f("ix_review_items_status"), "review_items", ["status"])
    op.create_index(op.f("ix_review_items_created_at"), "review_items", ["created_at"])


def downgrade() -> None:
    op.drop_table("review_items")
