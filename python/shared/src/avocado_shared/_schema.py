"""The schema of ``ml_results``: the table as the store's queries see it, and the Alembic
migrations that make it, run in-process (no ``alembic.ini`` at run time).

Alembic's script directory is ``migrations/``, data rather than a package, so importing the
package never runs its ``env.py``. Revisions in ``migrations/versions/`` are numbered
``0001``, ``0002``, ..., so a revision is also the schema version the store reports: a new one
is a file with the next number, ``down_revision`` the one before, and ``SCHEMA_VERSION``
raised to match.

A database made before Alembic holds revision 0001's table and a ``ml_results_schema`` table
at version 1 instead of ``alembic_version``; ``upgrade`` stamps it 0001 and goes on from
there, rows untouched. The old version table stays, unread here: a worker of the previous
release that starts during a rolling upgrade reads it, finds its schema current and works on,
instead of failing to create a table that exists.

Times are timezone-aware UTC both ways. On SQLite they travel as fixed-width ISO text, the
format rows written before SQLAlchemy have, so old and new rows sort together in time order.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

__all__ = ["SCHEMA_VERSION", "ml_results", "upgrade", "version"]

SCHEMA_VERSION = 1  # the number of the newest revision in migrations/versions/
_SCRIPTS = Path(__file__).parent / "migrations"
_LEGACY_TABLE = "ml_results_schema"
_ALEMBIC_TABLE = "alembic_version"
# Alembic is imported where it runs: a process that only reads rows never loads it.


class _UtcTime(sa.types.TypeDecorator[datetime]):
    """TIMESTAMPTZ on PostgreSQL, ISO 8601 text with microseconds and offset on SQLite."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.Text())
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return value.astimezone(timezone.utc).isoformat(timespec="microseconds")

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        if not isinstance(moment, datetime):
            raise TypeError(f"stored time is not a timestamp: {type(value).__name__}")
        if moment.tzinfo is None:
            return moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)


# none_as_null: a missing result is SQL NULL, as before, not the JSON text 'null'.
_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

ml_results = sa.Table(
    "ml_results",
    sa.MetaData(),
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
    sa.Column("total_duration_ms", sa.Double()),
    sa.Column("eval_duration_ms", sa.Double()),
    sa.Column("worker", sa.Text()),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("created_at", _UtcTime(), nullable=False),
    sa.Column("updated_at", _UtcTime(), nullable=False),
)


def upgrade(connection: sa.Connection) -> None:
    """Bring the schema to ``SCHEMA_VERSION`` in ``connection``'s transaction, which the
    caller holds a lock for."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    config.attributes["connection"] = connection
    if _revision(connection) is None and _legacy_version(connection):
        command.stamp(config, "0001")  # the code before Alembic only ever had version 1
    command.upgrade(config, "head")


def version(connection: sa.Connection) -> int:
    """The database's schema version, 0 when it has none; reads, never creates, a table."""
    revision = _revision(connection)
    return int(revision) if revision is not None else _legacy_version(connection)


def _revision(connection: sa.Connection) -> str | None:
    """Alembic's revision of the database, read as Alembic stores it (one row of
    ``alembic_version``), so a process that finds its schema current never loads Alembic."""
    if not sa.inspect(connection).has_table(_ALEMBIC_TABLE):
        return None
    found = connection.scalar(sa.text(f"SELECT version_num FROM {_ALEMBIC_TABLE}"))  # noqa: S608
    return None if found is None else str(found)


def _legacy_version(connection: sa.Connection) -> int:
    if not sa.inspect(connection).has_table(_LEGACY_TABLE):
        return 0
    found = connection.scalar(sa.text(f"SELECT MAX(version) FROM {_LEGACY_TABLE}"))  # noqa: S608
    return int(found or 0)
