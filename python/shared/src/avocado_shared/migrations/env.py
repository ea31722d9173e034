"""Alembic's environment for ``ml_results``: always online, on the connection and inside the
transaction that ``ResultStore.migrate`` hands over, so its lock covers every step."""

from __future__ import annotations

from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():
    context.run_migrations()
