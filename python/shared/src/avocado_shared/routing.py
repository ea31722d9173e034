"""Which queue a job goes to: the lane queue of its model.

Every job names a model (or gets the fleet's default) and a lane, and is published to the
queue of that model and lane, which only nodes whose server serves the model consume: a job
is never delivered to a node that would have to pull its model or hand it back. Interactive
work (the gateway, ``avocado generate --wait``) has a lane of its own, so it never waits
behind a backlog of batch work (summaries, bulk jobs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

__all__ = [
    "LANE_HEADER",
    "MODEL_QUEUE_PREFIX",
    "WANTED_MODELS",
    "Lane",
    "canonical_model",
    "canonical_models",
    "lane_queue_name",
    "model_of",
    "parse_lane",
]

# The lane a job was published in, for a plain AMQP producer to choose it on ``ml.generate``.
LANE_HEADER = "x-avocado-lane"
MODEL_QUEUE_PREFIX = "ml.model."
# A Redis set, under the key prefix, of every model a producer declared queues for: where a
# node that may pull looks for jobs no node can run.
WANTED_MODELS = "models:wanted"


class Lane(str, Enum):
    """How soon a job should start: interactive work takes a node's next free slot of its
    model before any batch work does."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


def parse_lane(value: object, default: Lane = Lane.BATCH) -> Lane:
    """``value`` as a lane; ``default`` when it is unset. ``ValueError`` names the lanes."""
    if value is None or value == "":
        return default
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return Lane(str(value).strip().lower())
    except ValueError:
        names = ", ".join(lane.value for lane in Lane)
        raise ValueError(f"unknown lane {value!r}: one of {names}") from None


def canonical_model(name: str) -> str:
    """One name per model: ``llama3.2`` and ``llama3.2:latest`` are one model, as Ollama
    says (a name without a tag means ``:latest``)."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def canonical_models(names: Iterable[str]) -> set[str]:
    """The canonical names of ``names``."""
    return {canonical_model(name) for name in names if name.strip()}


def lane_queue_name(model: str, lane: Lane) -> str:
    """``ml.model.<model>.<lane>``: the queue (and routing key) of ``model``'s ``lane``."""
    return f"{MODEL_QUEUE_PREFIX}{canonical_model(model)}.{lane.value}"


def model_of(request: Mapping[str, Any], default: str, embed_default: str | None = None) -> str:
    """The model a job's request names (a generation's or an embedding's ``model``, a
    summary's ``options.model``), canonical; when it names none, ``default``, or for an
    embedding (it has an ``input``) ``embed_default`` if given."""
    named = request.get("model")
    options = request.get("options")
    embedding = "input" in request
    if named is None and isinstance(options, Mapping) and "share_id" in request and not embedding:
        named = options.get("model")
    if embedding and embed_default is not None:
        default = embed_default
    return canonical_model(named if isinstance(named, str) and named.strip() else default)
