"""ml_results as the store wrote it before Alembic: one row per job identity.

The types are spelled out, not taken from the store's table, so this revision stays what it
was when the code changes: on SQLite times are ISO text and results JSON text, on PostgreSQL
TIMESTAMPTZ and JSONB.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TIME = sa.Text().with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")
_JSON = sa.Text().with_variant(postgresql.JSONB(), "postgresql")
_FLOAT: sa.types.TypeEngine[float] = sa.REAL().with_variant(
    postgresql.DOUBLE_PRECISION(), "postgresql"
)


def upgrade() -> None:
    op.create_table(
        "ml_results",
        sa.Column("job_key", sa.Text(), primary_key=True),
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("task_type", sa.Text(), nullable=False),
        sa.Column("share_id", sa.Text()),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("result", _JSON),
        sa.Column("error", sa.Text()),
        sa.Column("model", sa.Text()),
        sa.Column("prompt_tokens", sa.BigInteger()),
        sa.Column("completion_tokens", sa.BigInteger()),
        sa.Column("total_duration_ms", _FLOAT),
        sa.Column("eval_duration_ms", _FLOAT),
        sa.Column("worker", sa.Text()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
    )
    op.create_index("ml_results_job_id", "ml_results", ["job_id"])
    op.create_index("ml_results_status_updated", "ml_results", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_table("ml_results")
