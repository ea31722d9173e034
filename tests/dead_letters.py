"""A dead letter as a worker leaves one, for the tests of what shows them (``avocado status``,
the web page's fleet view)."""

from __future__ import annotations

import json
import uuid

from kombu.connection import Connection

from avocado_shared.dlq import dead_letter_headers
from avocado_shared.topology import DEAD_LETTER_EXCHANGE, GENERATE_TASK, declare_dead_letter_queue

__all__ = ["put_dead_letter"]


def put_dead_letter(connection: Connection, reason: str) -> str:
    """Dead-letter a job as a worker does (headers saying why); its id."""
    ident = str(uuid.uuid4())
    headers = dead_letter_headers(
        {"id": ident, "task": GENERATE_TASK},
        reason=reason,
        exchange="ml",
        routing_key="ml.generate",
        by="tests",
    )
    declare_dead_letter_queue(connection)
    connection.Producer().publish(
        json.dumps([[], {"request": {"prompt": "poison"}}, {}]),
        exchange=DEAD_LETTER_EXCHANGE,
        routing_key="ml.generate",
        headers=headers,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
    )
    return ident
