"""The batch lines whose jobs were dead-lettered, heard as it happens.

A dead-lettered job (malformed, or delivered past the queue's delivery limit) never gets a row
in ``ml_results``, so its batch would wait for it until its 24 hours end. Each gateway binds an
exclusive queue of its own to ``ml.dlx`` for the batch lanes' routing keys and notes each
letter's reason in its batch's ``:dead`` hash (job id -> why); the batch's feeder counts the
line failed at its next step and writes the reason to the error file. A letter that comes while
no gateway listens (all of them restarting) is missed: its batch waits for its window as before.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from kombu.connection import Connection
from kombu.entity import Queue

from avocado_infer.batches import FINAL, BatchStore, batch_of_job
from avocado_shared.dlq import read_letter
from avocado_shared.routing import MODEL_QUEUE_PREFIX, Lane
from avocado_shared.topology import DEAD_LETTER_EXCHANGE, listener_queue

__all__ = ["DeadLines"]

logger = logging.getLogger(__name__)

# Every model's batch lane: ml.model.<model>.batch, a model's name may hold dots.
_BATCH_LANES = f"{MODEL_QUEUE_PREFIX}#.{Lane.BATCH.value}"


class DeadLines:
    """This gateway's queue of the batch lanes' dead letters, read without waiting, on a
    connection of its own (``connect`` makes one)."""

    def __init__(self, connect: Callable[[], Connection], store: BatchStore) -> None:
        self.connect = connect
        self.store = store
        self.queue = listener_queue(
            f"avocado-infer.dead-lines.{uuid.uuid4().hex}", DEAD_LETTER_EXCHANGE, _BATCH_LANES
        )
        self._connection: Connection | None = None
        self._bound: Queue | None = None

    def heard(self) -> int:
        """Note the letters waiting (of open batches' lines); how many were noted. A broker
        that cannot be reached is tried again on the next call, with the queue bound anew."""
        noted = 0
        try:
            if self._bound is None:
                self._connection = self.connect()
                self._connection.ensure_connection(max_retries=1)
                self._bound = self.queue(self._connection.default_channel)
                self._bound.declare()
            while (message := self._bound.get(no_ack=True)) is not None:
                letter = read_letter(message)
                noted += self._note(letter.id, letter.reason)
        except Exception as error:  # the broker, or the channel it closed: the next pass
            logger.warning("batch lines' dead letters not read now: %s", error)
            self.close(broken=True)
        return noted

    def _note(self, job_id: str, reason: str) -> int:
        batch_id = batch_of_job(job_id)
        if batch_id is None:
            return 0
        batch = self.store.load(batch_id)
        if batch is None or batch.status in FINAL:
            return 0
        self.store.note_dead(batch_id, job_id, reason)
        return 1

    def close(self, broken: bool = False) -> None:
        """Close the connection (its queue goes with it); a ``broken`` one is dropped without
        a word to the broker, which may be gone."""
        connection, self._connection, self._bound = self._connection, None, None
        if connection is not None and broken:
            connection.collect()
        elif connection is not None:
            connection.release()
