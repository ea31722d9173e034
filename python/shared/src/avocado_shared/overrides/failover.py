"""kombu's connection checking each broker of a failover list against its own host name.

kombu 5.7 fills ``server_hostname: None`` with the host it connects to by writing into the
TLS options, which every connection of an app shares: after a failover, the next node would
be checked against the first node's name.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP
from kombu.connection import Connection

__all__ = ["FailoverAMQP", "FailoverConnection"]


class FailoverConnection(Connection):
    """kombu's connection; each connection, at each switch of node, gets its own copy of the
    TLS options to write the node's host name into."""

    def _init_params(self, **params: Any) -> None:  # type: ignore[override]  # kombu passes keywords
        options = params.get("ssl")
        if isinstance(options, dict) and "server_hostname" in options:
            params["ssl"] = {**options, "server_hostname": None}
        super()._init_params(**params)


class FailoverAMQP(AMQP):  # type: ignore[misc]
    """Celery's AMQP part, making its connections ``FailoverConnection``s."""

    Connection = FailoverConnection
