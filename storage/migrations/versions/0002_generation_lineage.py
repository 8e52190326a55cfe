"""generation lineage and deletion marks

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("mode", sa.String(length=16), nullable=False, server_default="txt2img")
        )
        batch_op.add_column(sa.Column("parent_generation_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("deleted_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_generations_parent_generation_id_generations"),
            "generations",
            ["parent_generation_id"],
            ["id"],
        )


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_generations_parent_generation_id_generations"), type_="foreignkey"
        )
        batch_op.drop_column("deleted_at")
        batch_op.drop_column("deleted_by")
        batch_op.drop_column("parent_generation_id")
        batch_op.drop_column("mode")
