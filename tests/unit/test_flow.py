"""What a failed publish may have left queued, told from the error alone."""

from __future__ import annotations

import amqp.exceptions
import pytest
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError

from avocado_shared.flow import BrokerBlocked, flow_transport_path, maybe_sent


def _raised_from(outer: Exception, inner: BaseException) -> Exception:
    """``outer`` raised from ``inner``, as kombu and redis-py re-raise socket errors."""
    outer.__cause__ = inner
    return outer


def _wrapped(inner: BaseException) -> Exception:
    return _raised_from(OperationalError(str(inner)), inner)


@pytest.mark.parametrize(
    "error",
    [
        BrokerBlocked("low on memory"),
        _wrapped(TimeoutError("timed out")),
        _wrapped(ConnectionResetError(104, "Connection reset by peer")),
    ],
    ids=["blocked", "no confirm in time", "reset mid-publish"],
)
def test_a_publish_cut_after_sending_may_have_queued_its_job(error: BaseException) -> None:
    assert maybe_sent(error)


@pytest.mark.parametrize(
    "error",
    [
        amqp.exceptions.PreconditionFailed("message size 2097350 is larger than configured"),
        amqp.exceptions.MessageNacked(),
        _raised_from(
            RedisConnectionError("Error 111 connecting to 127.0.0.1:6390."),
            ConnectionRefusedError(111, "Connection refused"),
        ),
        ValueError("not a publish failure"),
    ],
    ids=["refused by the broker", "nacked", "redis before the publish", "anything else"],
)
def test_a_refused_or_unsent_job_was_not_queued(error: BaseException) -> None:
    assert not maybe_sent(error)


def test_only_amqp_urls_get_the_flow_aware_transport() -> None:
    assert flow_transport_path("amqp://guest@host//") == "avocado_shared.flow:FlowTransport"
    assert flow_transport_path("amqps://guest@host//") == "avocado_shared.flow:FlowSSLTransport"
    assert flow_transport_path("memory://") is None
