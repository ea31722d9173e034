"""Which models a node takes jobs of: pure decisions, made from what its server and the
broker say, so a swap between models happens per decision, never per job.

A node takes the jobs of at most ``limit`` models at once (the models its server holds in
memory together; every model it serves when unlimited, as an OpenAI-compatible server
serves what it loaded). It keeps what it took while it stays on its server, prefers what the
server holds in memory now (a notebook that loaded another model), then the fleet's default.
It takes on a model whose jobs wait with no node to run them (pulling it first where it may),
giving up, when full, one of its models that no job waits for or that another node also
serves.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Demand", "Move", "adoption", "committed"]


@dataclass(frozen=True)
class Demand:
    """A model's lane queues as the broker counts them: jobs ready in all, and the most
    consumers of any lane (one per node that serves it)."""

    ready: int
    consumers: int


@dataclass(frozen=True)
class Move:
    """Take on ``take``, giving up ``give_up`` (None: there was room)."""

    take: str
    give_up: str | None


def committed(
    current: Sequence[str],
    found: Collection[str],
    loaded: Sequence[str],
    default: str,
    limit: int | None,
) -> list[str]:
    """The models to take jobs of, from those the server has (``found``): the current ones
    it holds in memory, then the others it holds, then the current ones, then ``default``;
    at most ``limit`` (all of ``found`` when None)."""
    order = [m for m in current if m in loaded] + [*loaded, *current, default]
    chosen: list[str] = []
    for model in order:
        if model in found and model not in chosen:
            chosen.append(model)
    if limit is None:
        return chosen + sorted(m for m in found if m not in chosen)
    return chosen[:limit]


def adoption(
    current: Sequence[str],
    waiting: Mapping[str, Demand],
    own: Mapping[str, Demand],
    *,
    found: Collection[str],
    can_fetch: bool,
    limit: int | None,
) -> Move | None:
    """The model to take on, if any: of those whose jobs wait (``waiting``) with no node
    consuming them, the one with the most, that the server has or can fetch; with no room
    left, in place of one of ``current`` (their ``own`` demand) that no job waits for or
    that another node serves too. None: nothing to move."""
    candidates = sorted(
        (
            model
            for model, demand in waiting.items()
            if model not in current
            and demand.ready
            and not demand.consumers
            and (model in found or can_fetch)
        ),
        key=lambda model: (-waiting[model].ready, model),
    )
    if not candidates:
        return None
    if limit is None or len(current) < limit:
        return Move(candidates[0], None)
    spare = [m for m in current if m in own and (not own[m].ready or own[m].consumers > 1)]
    if not spare:
        return None
    return Move(candidates[0], min(spare, key=lambda m: (own[m].ready, m)))
