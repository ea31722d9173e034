"""The result store's SQLAlchemy engine: SQLite in WAL mode or PostgreSQL over psycopg 3, with
connect timeouts, and a pool that a forked child replaces without touching its parent's
connections (SQLAlchemy's recipe for ``os.fork``)."""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
import weakref

import sqlalchemy as sa
from sqlalchemy import event

__all__ = ["WRITES", "Encoded", "dump_json", "make_engine"]

_SQLITE_BUSY_TIMEOUT_S = 30.0
_PG_CONNECT_TIMEOUT_S = 10
_APPLICATION_NAME = "avocado-results"
# An execution option: the connection writes, so on SQLite it takes the write lock at BEGIN.
WRITES = "avocado_writes"

dump_json = functools.partial(
    json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":")
)


class Encoded(str):
    """A JSON value encoded already (the store encodes a result to check it): the JSON
    columns take its text as it is instead of encoding it a second time."""


def _serialize(value: object) -> str:
    return value if isinstance(value, Encoded) else dump_json(value)


_ENGINES: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def make_engine(url: sa.URL) -> sa.Engine:
    """An engine for ``url`` (``sqlite`` or ``postgresql+psycopg``); connects on first use."""
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(
            url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S}, json_serializer=_serialize
        )
        event.listen(engine, "connect", _sqlite_connected)
        event.listen(engine, "begin", _sqlite_begin)
    else:
        defaults = {"connect_timeout": _PG_CONNECT_TIMEOUT_S, "application_name": _APPLICATION_NAME}
        engine = sa.create_engine(
            url,
            connect_args={k: v for k, v in defaults.items() if k not in url.query},
            pool_pre_ping=True,  # a connection the server dropped is replaced before use
            json_serializer=_serialize,
        )
    _ENGINES.add(engine)
    return engine


def _sqlite_connected(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # SQLAlchemy's recipe: the driver emits no BEGIN of its own, _sqlite_begin does.
    dbapi_connection.isolation_level = None
    # WAL lets readers run beside the one writer; the busy timeout makes writers queue.
    # Switching to WAL ignores the busy timeout when many processes open at once.
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as busy:
            if "locked" not in str(busy) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    # In WAL mode NORMAL syncs at checkpoints, not at each commit: a committed row survives a
    # crashed or killed worker, not a power cut, as Redis's AOF everysec.
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _sqlite_begin(connection: sa.Connection) -> None:
    # A writer locks at BEGIN, so concurrent migrations queue on the busy timeout instead of
    # both finding the table missing; readers begin deferred and never block the writer.
    writes = connection.get_execution_options().get(WRITES, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def _forget_parent_pools() -> None:
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_pools)
