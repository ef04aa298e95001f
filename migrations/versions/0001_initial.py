"""Initial schema: species, model versions, individuals, images, embeddings, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types at this revision (migrations never import the live models).
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonDoc = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "species",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_species")),
        sa.UniqueConstraint("name", name=op.f("uq_species_name")),
    )

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("species_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("embedding_dim", sa.Integer(), nullable=False),
        sa.Column("preprocess_version", sa.String(length=32), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("card", JsonDoc, nullable=False),
        _ts("created_at"),
        _ts("activated_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["species_id"], ["species.id"], name=op.f("fk_model_versions_species_id_species"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("species_id", "version", name=op.f("uq_model_versions_species_id_version")),
    )
    op.create_index(op.f("ix_model_versions_species_id"), "model_versions", ["species_id"])
    op.create_index(
        "uq_model_versions_active_species",
        "model_versions",
        ["species_id"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )

    op.create_table(
        "individuals",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("species_id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("metadata", JsonDoc, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["species_id"], ["species.id"], name=op.f("fk_individuals_species_id_species"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_individuals")),
        sa.UniqueConstraint("species_id", "external_id", name=op.f("uq_individuals_species_id_external_id")),
    )
    op.create_index(op.f("ix_individuals_species_id"), "individuals", ["species_id"])

    op.create_table(
        "images",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("individual_id", sa.Uuid(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_path", sa.String(length=512), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["individual_id"], ["individuals.id"], name=op.f("fk_images_individual_id_individuals"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("individual_id", "sha256", name=op.f("uq_images_individual_id_sha256")),
    )
    op.create_index(op.f("ix_images_individual_id"), "images", ["individual_id"])
    op.create_index(op.f("ix_images_sha256"), "images", ["sha256"])

    op.create_table(
        "embeddings",
        sa.Column("id", BigIntId, autoincrement=True, nullable=False),
        sa.Column("image_id", sa.Uuid(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_embeddings_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_embeddings_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_embeddings")),
        sa.UniqueConstraint("image_id", "model_version_id", name=op.f("uq_embeddings_image_id_model_version_id")),
    )
    op.create_index(op.f("ix_embeddings_image_id"), "embeddings", ["image_id"])
    op.create_index(op.f("ix_embeddings_model_version_id"), "embeddings", ["model_version_id"])

    op.create_table(
        "audit_log",
        sa.Column("id", BigIntId, autoincrement=True, nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("species", sa.String(length=64), nullable=False),
        sa.Column("individual_id", sa.Uuid(), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("details", JsonDoc, nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_action"), "audit_log", ["action"])
    op.create_index(op.f("ix_audit_log_created_at"), "audit_log", ["created_at"])
    op.create_index(op.f("ix_audit_log_individual_id"), "audit_log", ["individual_id"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("embeddings")
    op.drop_table("images")
    op.drop_table("individuals")
    op.drop_table("model_versions")
    op.drop_table("species")
