"""Where the tests go among pytest-xdist's workers, so that a module whose fixture starts a
server of its own (a private RabbitMQ node, a TLS broker, the model server) starts it once.

``--dist worksteal`` hands each worker a contiguous block of the collection, then moves the
far half of a busy worker's queue to an idle one. A module cut by a block's edge, or moved
half, sets its module fixture up on two workers: a RabbitMQ node boots twice. Placed at the
start of a block, a module runs first on its worker and is never moved.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

__all__ = ["OWN_SERVERS", "place"]

# Modules whose module-scoped fixture starts a server of their own, costliest first.
OWN_SERVERS = (
    "integration/test_admin.py",
    "integration/test_tls.py",
    "integration/test_real_model.py",
    "integration/test_flow_control.py",
    "integration/test_infer_limits.py",
)


def _blocks(total: int, workers: int) -> list[int]:
    """The sizes of worksteal's first blocks: what is left, shared evenly, one by one."""
    sizes = []
    for index in range(workers):
        sizes.append((total - sum(sizes)) // (workers - index))
    return sizes


def place(items: Sequence[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` reordered: each own-server module at the start of a block (the costliest
    to the block with the least such work), the other tests after, in their order."""
    owned: dict[str, list[pytest.Item]] = {name: [] for name in OWN_SERVERS}
    rest: list[pytest.Item] = []
    for item in items:
        owned.get(f"{item.path.parent.name}/{item.path.name}", rest).append(item)
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for name in OWN_SERVERS:
        if owned[name]:
            min(heads, key=len).extend(owned[name])
    placed: list[pytest.Item] = []
    for head, size in zip(heads, _blocks(len(items), workers), strict=True):
        placed += head
        take = max(0, size - len(head))
        placed += rest[:take]
        del rest[:take]
    return placed + rest
