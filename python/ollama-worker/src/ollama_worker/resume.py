"""Where a new attempt of a generation starts: the text its earlier attempts streamed; and
the end of a stream that no attempt ended.

A job redelivered after its worker died, or retried after a cut connection, continues the
answer its stream already holds, so a reader sees neither a repeat nor a gap.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from avocado_shared.cancel import cancel_key
from avocado_shared.streams import (
    EntryKind,
    JobStream,
    StreamSnapshot,
    StreamUnavailable,
    error_fields,
    restart_fields,
)
from ollama_worker.resources import Resources
from ollama_worker.token_stream import TokenStream

__all__ = ["end_unended", "open_stream", "options_left"]

logger = logging.getLogger(__name__)


def options_left(options: dict[str, Any], streamed: StreamSnapshot) -> dict[str, Any]:
    """A continued answer's ``num_predict`` less what was streamed (a chunk is a token on
    Ollama and llama.cpp, nearly always on vLLM), so the whole stays within the limit."""
    limit = options.get("num_predict")
    if not streamed.text or not isinstance(limit, int) or limit < 0:
        return options
    return {**options, "num_predict": max(1, limit - streamed.chunks)}


def open_stream(resources: Resources, job_id: str) -> tuple[TokenStream, StreamSnapshot]:
    """The job's stream writer and what earlier attempts streamed, to continue.

    A stream that ended in an error belonged to a run that is over (the job is run again):
    it starts afresh. One that cannot be read, or that this server cannot continue
    (``stream_resume=restart``), gets a restart entry: readers drop what came before it.
    """
    settings = resources.settings
    reader = JobStream(resources.redis(), settings.key_prefix, job_id)
    cancel = cancel_key(settings.key_prefix, job_id)
    stream = TokenStream(reader.client, reader.key, settings.stream_ttl_s, cancel)
    try:
        streamed = reader.snapshot()
        if streamed.end is not None and streamed.end.kind is EntryKind.ERROR:
            reader.client.delete(reader.key)
            streamed = StreamSnapshot()
    except (StreamUnavailable, RedisError) as error:
        logger.warning("job %s: stream not readable, the answer starts over: %s", job_id, error)
        stream.add(restart_fields(f"stream not readable: {error}"))
        return stream, StreamSnapshot()
    if streamed.text and settings.stream_resume == "restart":
        stream.add(restart_fields("the inference server cannot continue a partial answer"))
        return stream, StreamSnapshot()
    if streamed.text:
        logger.info("job %s continues its streamed answer (%d chunks)", job_id, streamed.chunks)
    return stream, streamed


def end_unended(resources: Resources, job_id: str, reason: str) -> None:
    """End the job's stream with ``reason`` unless a run of it did: a job refused before it
    ran (cancelled while queued) or failed outside its generation, so that a reader (the
    gateway) stops waiting now instead of at its timeout. Best effort: Redis may be down."""
    settings = resources.settings
    reader = JobStream(resources.redis(), settings.key_prefix, job_id)
    try:
        if reader.snapshot().end is None:
            TokenStream(reader.client, reader.key, settings.stream_ttl_s).close(
                error_fields(reason)
            )
    except (StreamUnavailable, RedisError) as error:
        logger.warning("job %s: its stream not ended (%s): %s", job_id, reason, error)
