"""Index change log: a monotonic sequence of committed changes to searchable vectors, so that API
replicas on one Postgres database keep their indexes in step (LISTEN/NOTIFY plus catch-up).

Revision ID: 0005
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "index_changes",
        sa.Column("seq", BigIntId, autoincrement=True, nullable=False),
        sa.Column("species", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("embedding_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_index_changes")),
    )
    op.create_index(op.f("ix_index_changes_created_at"), "index_changes", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_index_changes_created_at"), table_name="index_changes")
    op.drop_table("index_changes")
