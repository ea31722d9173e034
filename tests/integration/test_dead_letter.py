"""Poison ends in ``ml.dead-letter`` with its reason, the worker keeps serving, replay works.

The session shares one vhost: every message here has its own id and the dead-letter queue
is searched by id, never assumed empty.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task
from celery.exceptions import Reject
from kombu import Connection, Queue
from kombu import Producer as KombuProducer

from avocado_shared import GenerateResult, JobFailed, Producer, Settings, make_celery
from avocado_shared.dlq import (
    DEATHS_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    DeadLetter,
    DeadLetterNotFound,
    ReplayFailed,
    list_dead_letters,
    raw_body,
    replay,
)
from avocado_shared.dlq_command import run_dlq
from avocado_shared.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, GENERATE_TASK
from ollama_worker.deadletter import dead_letter_message, dead_letter_task
from tests.services import REDIS_URL, WorkerProcess, run_cli, service_env, wait_for

pytestmark = [pytest.mark.usefixtures("worker"), pytest.mark.both_brokers]

WAIT = 60
JSON = "application/json"
PICKLE = "application/x-python-serialize"
DEAD_BROKER = "amqp://guest:guest@127.0.0.1:1//"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass(frozen=True)
class Poison:
    """One kind of poison message, and what its reason must contain."""

    body: bytes
    reason: str
    task: str | None = GENERATE_TASK
    with_id: bool = True
    content_type: str = JSON
    content_encoding: str = "utf-8"


def _job_body(prompt: Any = "Say hi.") -> bytes:
    """A protocol 2 body of ``avocado.generate``: ``[args, kwargs, embed]``."""
    request = {"prompt": prompt, "model": "llama3.2:1b", "options": {"num_predict": 8}}
    return json.dumps([[], {"request": request}, EMBED]).encode()


POISON = {
    # 1. the body cannot be decoded, or its content type is refused
    "not-json": Poison(b'{"args": [', "undecodable body (application/json)"),
    "pickle": Poison(
        b"\x80\x04K\x01.",
        f"content type not accepted ({PICKLE})",
        content_type=PICKLE,
        content_encoding="binary",
    ),
    "pickle-without-task-header": Poison(
        b"\x80\x04K\x01.",
        "content type not accepted",
        task=None,
        with_id=False,
        content_type=PICKLE,
        content_encoding="binary",
    ),
    "not-utf8-without-task-header": Poison(
        b"\xff\xfe{", "undecodable body", task=None, with_id=False
    ),
    # 2. a task no worker has
    "unknown-task": Poison(
        _job_body(), "unknown task 'avocado.no-such-task'", task="avocado.no-such-task"
    ),
    # 3. not a task message at all, or a malformed one (stock Celery 5.7 dies on the last three)
    "no-task-header": Poison(
        b'{"hello": "world"}', "not a Celery task message", task=None, with_id=False
    ),
    "task-without-id": Poison(_job_body(), "task message without an 'id' header", with_id=False),
    "body-not-a-triple": Poison(b'{"request": {"prompt": "hi"}}', "malformed task message"),
    "body-a-number": Poison(b"42", "malformed task message"),
}


@pytest.fixture
def connection(producer: Producer) -> Iterator[Connection]:
    with producer.app.connection_for_write() as made:
        made.ensure_connection(max_retries=3)
        yield made


@pytest.mark.parametrize("kind", list(POISON))
def test_poison_is_dead_lettered_with_its_reason_and_the_worker_keeps_serving(
    kind: str, producer: Producer, connection: Connection, worker: WorkerProcess
) -> None:
    poison = POISON[kind]
    ident = str(uuid.uuid4())
    headers: dict[str, Any] = {"x-test-kind": kind}
    if poison.task is not None:
        headers["task"] = poison.task
    if poison.with_id:
        headers["id"] = ident
    _publish(
        connection,
        poison.body,
        headers=headers,
        content_type=poison.content_type,
        content_encoding=poison.content_encoding,
        message_id=ident,
    )

    letter = _await_dead_letter(connection, ident)

    assert poison.reason in letter.reason
    assert letter.headers[REASON_HEADER] == letter.reason
    assert letter.task == poison.task
    assert (letter.original_exchange, letter.original_routing_key) == ("ml", "ml.generate")
    assert letter.dead_lettered_at is not None
    assert letter.dead_lettered_by == worker.name
    assert letter.deaths == 1
    assert (letter.content_type, letter.size) == (poison.content_type, len(poison.body))
    assert letter.headers["x-test-kind"] == kind
    assert isinstance(producer.generate("hi").get(timeout=WAIT), GenerateResult)
    assert worker.alive(), worker.log_text()


def test_dead_letter_keeps_body_bytes_content_type_and_is_persistent(
    connection: Connection,
) -> None:
    ident = str(uuid.uuid4())
    body = b"\x80\x04\x95 not json \x00\xff"
    headers = {"task": GENERATE_TASK, "id": ident}
    _publish(connection, body, headers=headers, content_type=PICKLE, content_encoding="binary")
    _await_dead_letter(connection, ident)

    with _raw_dead_letter(connection, ident) as message:
        assert raw_body(message) == body
        assert (message.content_type, message.content_encoding) == (PICKLE, "binary")
        assert message.properties["delivery_mode"] == 2
        assert message.delivery_info["exchange"] == DEAD_LETTER_EXCHANGE.name
        assert message.delivery_info["routing_key"] == "ml.generate"
        assert message.headers[ORIGINAL_EXCHANGE_HEADER] == "ml"
        assert message.headers[ORIGINAL_ROUTING_KEY_HEADER] == "ml.generate"


def test_unknown_task_fails_a_waiting_client_at_once(
    producer: Producer, connection: Connection
) -> None:
    ident = str(uuid.uuid4())
    _publish(connection, _job_body(), headers={"task": "avocado.gone", "id": ident})

    with pytest.raises(JobFailed, match="NotRegistered"):
        producer.handle(ident).get(timeout=WAIT)
    assert "unknown task 'avocado.gone'" in _await_dead_letter(connection, ident).reason


def test_replay_with_a_corrected_body_runs_the_job_and_removes_the_dead_letter(
    producer: Producer, connection: Connection
) -> None:
    ident = str(uuid.uuid4())
    _publish(connection, b'[[], {"request": ', headers={"task": GENERATE_TASK, "id": ident})
    assert "undecodable body" in _await_dead_letter(connection, ident).reason

    replayed = replay(connection, ident, body=_job_body("Name a colour."), app=producer.app)

    assert replayed.id == ident
    result = producer.handle(ident).get(timeout=WAIT)
    assert isinstance(result, GenerateResult)
    assert result.job_id == ident
    assert _find(connection, ident) is None


def test_dead_letter_task_rebuilds_the_job_message_and_its_replay_runs(
    producer: Producer, connection: Connection, settings: Settings
) -> None:
    """What tasks.py does on InvalidPayload, on a request like the one a worker sets up."""
    ident = str(uuid.uuid4())
    task = _generate_stub(make_celery("dead-letter-test", settings))
    kwargs = {"request": {"prompt": 5, "model": "llama3.2:1b"}}
    with _running(task, ident, kwargs, original_headers={"x-caller": "kept"}):
        dead_letter_task(task, "invalid payload: prompt: Input should be a valid string")

    letter = _await_dead_letter(connection, ident)
    assert letter.reason == "invalid payload: prompt: Input should be a valid string"
    assert letter.task == GENERATE_TASK
    assert (letter.original_exchange, letter.original_routing_key) == ("ml", "ml.generate")
    assert letter.dead_lettered_by == "test-worker@localhost"
    assert letter.headers["x-caller"] == "kept"
    assert (letter.headers["retries"], letter.headers["timelimit"]) == (1, [660, 600])
    assert json.loads(letter.body_preview) == [[], kwargs, EMBED]

    replay(connection, ident, body=_job_body("Why is grass green?"), app=producer.app)
    assert producer.handle(ident).get(timeout=WAIT).job_id == ident
    assert _find(connection, ident) is None


def test_when_the_dlx_publish_fails_the_message_is_rejected_and_rabbitmq_dead_letters_it(
    connection: Connection,
) -> None:
    dead_app = make_celery("dead-broker", Settings(broker_url=DEAD_BROKER, redis_url=REDIS_URL))
    with _scratch_queue(connection) as queue:
        ident = _uid("fallback")
        _publish(connection, b'{"poison": true}', message_id=ident, **_to(queue))
        message = wait_for(lambda: queue.get(no_ack=False), what="the scratch message")

        assert dead_letter_message(dead_app, message, "undecodable body: test", timeout=2) is False

        letter = _await_dead_letter(connection, ident)
        assert letter.reason == f"rejected without requeue in {queue.name} (RabbitMQ: rejected)"
        assert (letter.original_exchange, letter.original_routing_key) == ("", queue.name)
        assert letter.deaths == 1
        assert letter.dead_lettered_at is not None
        replay(connection, ident)
        back = wait_for(lambda: queue.get(no_ack=True), what="the replayed message")
        assert raw_body(back) == b'{"poison": true}'
        assert REASON_HEADER not in (back.headers or {})
        assert _find(connection, ident) is None


def test_dead_letter_task_rejects_the_job_when_the_dlx_publish_fails() -> None:
    dead_app = make_celery("dead-broker", Settings(broker_url=DEAD_BROKER, redis_url=REDIS_URL))
    task = _generate_stub(dead_app)
    with _running(task, str(uuid.uuid4()), {"request": {}}), pytest.raises(Reject) as raised:
        dead_letter_task(task, "invalid payload: empty")
    assert raised.value.requeue is False


def test_delivery_limit_deaths_by_rabbitmq_are_listed_from_x_death(connection: Connection) -> None:
    with _scratch_queue(connection, delivery_limit=1) as queue:
        ident = _uid("limit")
        _publish(connection, b"{}", message_id=ident, **_to(queue))
        for _ in range(2):
            wait_for(lambda: queue.get(no_ack=False), what="a delivery").requeue()

        letter = _await_dead_letter(connection, ident)

        assert letter.reason.startswith("delivered more often than the delivery limit")
        assert letter.reason.endswith(f"in {queue.name} (RabbitMQ: delivery_limit)")
        assert letter.original_routing_key == queue.name
        assert letter.deaths == 1
        replay(connection, ident)
        assert raw_body(wait_for(lambda: queue.get(no_ack=True), what="the replay")) == b"{}"


def test_listing_removes_nothing_and_keeps_the_order(connection: Connection) -> None:
    idents = [_uid("order") for _ in range(3)]
    for ident in idents:
        headers = {REASON_HEADER: "test", DEATHS_HEADER: 1}
        _publish(connection, b"{}", headers=headers, message_id=ident, **_to_dlx())
    wait_for(lambda: all(_find(connection, i) for i in idents), what="three dead letters")

    first = [x.id for x in list_dead_letters(connection, limit=10_000) if x.id in idents]
    second = [x.id for x in list_dead_letters(connection, limit=10_000) if x.id in idents]

    assert first == second == idents


def test_replay_of_a_missing_id_or_a_body_that_is_not_json_fails_and_keeps_the_letter(
    connection: Connection,
) -> None:
    with pytest.raises(DeadLetterNotFound):
        replay(connection, _uid("missing"))

    ident = _uid("kept")
    _publish(connection, b"{}", headers={REASON_HEADER: "test"}, message_id=ident, **_to_dlx())
    _await_dead_letter(connection, ident)
    with pytest.raises(ValueError, match="not JSON"):
        replay(connection, ident, body=b"{nope")
    assert _find(connection, ident) is not None


@pytest.mark.parametrize(
    ("exchange", "routing_key"), [("no-such-exchange", "ml.generate"), ("ml", "no.such.key")]
)
def test_a_replay_the_broker_refuses_raises_and_keeps_the_letter(
    exchange: str, routing_key: str, connection: Connection
) -> None:
    ident = _uid("refused")
    headers = {
        REASON_HEADER: "test",
        ORIGINAL_EXCHANGE_HEADER: exchange,
        ORIGINAL_ROUTING_KEY_HEADER: routing_key,
    }
    _publish(connection, b"{}", headers=headers, message_id=ident, **_to_dlx())
    _await_dead_letter(connection, ident)

    with pytest.raises(ReplayFailed, match=f"not replayed to {exchange}/{routing_key}"):
        replay(connection, ident)

    assert _find(connection, ident) is not None


def test_run_dlq_lists_and_replays_from_a_body_file(
    producer: Producer, connection: Connection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ident = str(uuid.uuid4())
    headers = {
        "task": GENERATE_TASK,
        "id": ident,
        REASON_HEADER: "invalid payload: from the cli test",
        ORIGINAL_EXCHANGE_HEADER: "ml",
        ORIGINAL_ROUTING_KEY_HEADER: "ml.generate",
    }
    _publish(connection, _job_body(5), headers=headers, **_to_dlx())
    _await_dead_letter(connection, ident)

    assert run_dlq(_args("list", limit=10_000, json=True), connection) == 0
    listed = {x["id"]: x for x in json.loads(capsys.readouterr().out)}
    assert listed[ident]["reason"] == "invalid payload: from the cli test"
    assert run_dlq(_args("list", limit=10_000, json=False), connection) == 0
    assert f"{ident}  {GENERATE_TASK}  deaths=0" in capsys.readouterr().out

    body = tmp_path / "body.json"
    body.write_bytes(_job_body("Corrected."))
    assert run_dlq(_args("replay", id=ident, body=body), connection, app=producer.app) == 0
    assert capsys.readouterr().out.strip() == f"replayed {ident} to ml/ml.generate"
    assert producer.handle(ident).get(timeout=WAIT).job_id == ident
    with pytest.raises(DeadLetterNotFound, match="no dead letter") as missing:
        run_dlq(_args("replay", id=ident, body=None), connection)
    assert missing.value.exit_code == 4


def test_avocado_dlq_list_json(broker_url: str, key_prefix: str, connection: Connection) -> None:
    env = service_env(broker_url, key_prefix)
    ident = _uid("avocado-cli")
    _publish(connection, b"{}", headers={REASON_HEADER: "cli"}, message_id=ident, **_to_dlx())
    _await_dead_letter(connection, ident)

    done = run_cli(env, "dlq", "list", "--json", "--limit", "10000")

    assert done.returncode == 0, done.stderr
    assert {"id": ident, "reason": "cli"}.items() <= next(
        x for x in json.loads(done.stdout) if x["id"] == ident
    ).items()


def test_invalid_payload_in_the_task_is_dead_lettered_and_replayable(
    producer: Producer, connection: Connection
) -> None:
    sent = producer.app.send_task(GENERATE_TASK, kwargs={"request": {"prompt": 5}})

    with pytest.raises(JobFailed, match="InvalidPayload"):
        producer.handle(sent.id).get(timeout=WAIT)
    letter = _await_dead_letter(connection, sent.id)
    assert letter.reason.startswith("invalid payload")
    assert (letter.original_exchange, letter.original_routing_key) == ("ml", "ml.generate")

    replay(connection, sent.id, body=_job_body("Fixed."), app=producer.app)
    assert producer.handle(sent.id).get(timeout=WAIT).job_id == sent.id
    assert _find(connection, sent.id) is None


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _publish(
    connection: Connection,
    body: bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    content_type: str = JSON,
    content_encoding: str = "utf-8",
    message_id: str | None = None,
    exchange: str = "ml",
    routing_key: str = "ml.generate",
) -> None:
    """Publish raw bytes, confirmed, as a foreign or buggy producer would."""
    properties = {"message_id": message_id} if message_id else {}
    KombuProducer(connection.default_channel).publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        headers=dict(headers or {}),
        content_type=content_type,
        content_encoding=content_encoding,
        mandatory=True,
        **properties,
    )


def _to(queue: Queue) -> dict[str, str]:
    """Straight to ``queue``, through the default exchange."""
    return {"exchange": "", "routing_key": queue.name}


def _to_dlx() -> dict[str, str]:
    """Straight to the dead-letter exchange, as a worker publishes."""
    return {"exchange": DEAD_LETTER_EXCHANGE.name, "routing_key": "ml.generate"}


def _find(connection: Connection, ident: str) -> DeadLetter | None:
    return next((x for x in list_dead_letters(connection, limit=10_000) if x.id == ident), None)


def _await_dead_letter(connection: Connection, ident: str) -> DeadLetter:
    return wait_for(lambda: _find(connection, ident), timeout=WAIT, what=f"{ident} dead-lettered")


@contextmanager
def _raw_dead_letter(connection: Connection, ident: str) -> Iterator[Any]:
    """The raw message of one dead letter; all read go back in order afterwards."""
    channel = connection.channel()
    held: list[Any] = []
    try:
        queue = Queue(DEAD_LETTER_QUEUE, channel=channel)
        while (message := queue.get(no_ack=False)) is not None:
            held.append(message)
            if (message.headers or {}).get("id") == ident:
                break
        assert held, f"{ident} is not in {DEAD_LETTER_QUEUE}"
        yield held[-1]
    finally:
        for message in held:
            message.requeue()
        channel.close()


@contextmanager
def _scratch_queue(connection: Connection, delivery_limit: int | None = None) -> Iterator[Queue]:
    """A quorum queue of one test that dead-letters to ``ml.dlx`` as the job queues do."""
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name,
    }
    if delivery_limit is not None:
        arguments["x-delivery-limit"] = delivery_limit
    channel = connection.channel()
    queue = Queue(_uid("test-dlq"), queue_arguments=arguments)(channel)
    queue.declare()
    try:
        yield queue
    finally:
        queue.delete()
        channel.close()


def _generate_stub(app: Celery) -> Task:
    """An ``avocado.generate`` that only ever runs under a pushed request."""

    @app.task(name=GENERATE_TASK, bind=True, shared=False)
    def generate(self: Task, request: dict[str, Any]) -> None:
        raise AssertionError("never run")

    return app.tasks[GENERATE_TASK]


@contextmanager
def _running(
    task: Task,
    ident: str,
    kwargs: dict[str, Any],
    original_headers: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """The request a worker sets up for a job from ``ml.generate`` on its second try."""
    task.push_request(
        id=ident,
        task=GENERATE_TASK,
        args=[],
        kwargs=kwargs,
        retries=1,
        root_id=ident,
        timelimit=[660, 600],
        origin="producer@test",
        hostname="test-worker@localhost",
        called_directly=False,
        delivery_info={"exchange": "ml", "routing_key": "ml.generate", "redelivered": False},
        properties={
            "correlation_id": ident,
            "reply_to": "",
            "application_headers": {"task": GENERATE_TASK, "id": ident, **(original_headers or {})},
        },
    )
    try:
        yield
    finally:
        task.pop_request()


def _args(command: str, **values: Any) -> argparse.Namespace:
    return argparse.Namespace(dlq_command=command, **values)
