"""``avocado``: submit jobs, read results, show the topology, the dead letters and the live
endpoints, manage the gateway's API keys from a shell."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from avocado_shared.admin import AdminError, create_worker, delete_worker
from avocado_shared.batch_command import add_batch_parser, run_batch
from avocado_shared.contracts import (
    EmbedResult,
    GenerateResult,
    InvalidRequest,
    JobKind,
    JobResult,
    SummarizeResult,
    parse_result,
)
from avocado_shared.discovery import Announcement, Endpoint, EndpointWatcher
from avocado_shared.dlq_command import add_dlq_parser, run_dlq
from avocado_shared.errors import AvocadoError, NotFound, Unavailable
from avocado_shared.fleet import WorkerRegistry
from avocado_shared.jobs import JobFailed
from avocado_shared.keys_command import add_keys_parser, run_keys
from avocado_shared.producer import JobHandle, Producer
from avocado_shared.registry import NodeRegistry
from avocado_shared.routing import Lane, canonical_model
from avocado_shared.settings import Settings
from avocado_shared.status import collect, render
from avocado_shared.store import JobStatus, ResultStore, job_key
from avocado_shared.topology import describe

__all__ = ["main"]


def _option(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value as JSON when it parses, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avocado", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def waitable(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait", action="store_true", help="wait for the result and print it")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds --wait may take")
        p.add_argument("--json", action="store_true", help="print JSON")

    def laned(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--lane",
            choices=[lane.value for lane in Lane],
            help="interactive (ahead of batch work; the default with --wait) or batch "
            "(the default without)",
        )

    gen = sub.add_parser("generate", help="enqueue a prompt (or chat) generation job")
    gen.add_argument("prompt", nargs="?", help="the prompt; omit with --messages")
    gen.add_argument("--messages", type=Path, help="a JSON file with a list of chat messages")
    gen.add_argument("--model")
    gen.add_argument("--system")
    gen.add_argument(
        "--option",
        "-o",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Ollama option such as temperature=0.2 or num_predict=64 (repeatable)",
    )
    gen.add_argument("--format", help='"json" or a JSON schema (inline or @file)')
    gen.add_argument("--keep-alive")
    gen.add_argument("--idempotency-key")
    waitable(gen)
    laned(gen)

    summ = sub.add_parser("summarize", help="enqueue a summary of a shared item")
    summ.add_argument("--share-id", required=True)
    source = summ.add_mutually_exclusive_group(required=True)
    source.add_argument("--text")
    source.add_argument("--file", type=Path)
    summ.add_argument("--title")
    summ.add_argument("--max-words", type=int)
    summ.add_argument("--language")
    summ.add_argument("--model")
    waitable(summ)
    laned(summ)

    emb = sub.add_parser(
        "embed", help="enqueue the embedding of texts (one job); with --wait, print the vectors"
    )
    emb.add_argument("texts", nargs="*", help="the texts; none: one a line from stdin")
    emb.add_argument("--model", help="default AVOCADO_EMBED_MODEL")
    emb.add_argument("--share-id", help="the embedding of this shared item (one job at a time)")
    emb.add_argument("--dimensions", type=int, help="cut each vector to this many")
    emb.add_argument(
        "--no-truncate", action="store_true", help="fail on a text over the context, not cut it"
    )
    emb.add_argument("--keep-alive")
    emb.add_argument("--idempotency-key")
    waitable(emb)
    laned(emb)

    res = sub.add_parser("result", help="show a job's state and result, from ml_results")
    which = res.add_mutually_exclusive_group(required=True)
    which.add_argument("job_id", nargs="?")
    which.add_argument("--share-id", help="the latest summary job of this shared item")
    res.add_argument(
        "--embedding", action="store_true", help="with --share-id: its embedding, not its summary"
    )
    waitable(res)

    sub.add_parser("topology", help="declare the exchanges and queues, then show them")
    add_dlq_parser(sub)
    add_keys_parser(sub)
    add_batch_parser(sub)

    ends = sub.add_parser("endpoints", help="the fleet's live Ollama endpoints")
    ends.add_argument("--watch", action="store_true", help="then print announcements as they come")
    ends.add_argument("--json", action="store_true", help="one JSON object per line")

    stat = sub.add_parser(
        "status", help="queues, workers, dead letters, endpoints and recent failures at once"
    )
    stat.add_argument("--json", action="store_true", help="print JSON")
    stat.add_argument("--dead-letters", type=int, default=5, help="newest dead letters to show")
    stat.add_argument("--failures", type=int, default=5, help="recent failed jobs to show")
    stat.add_argument("--timeout", type=float, default=1.0, help="seconds workers get to answer")

    admin = sub.add_parser(
        "admin", help="least-privilege worker users (run with the admin's .env)"
    ).add_subparsers(dest="admin_command", required=True)
    create = admin.add_parser(
        "create-worker",
        help="create (or give a new password to) a worker's RabbitMQ and Redis users and "
        "print its secrets",
    )
    create.add_argument("name", help="user name in RabbitMQ and Redis")
    create.add_argument("--broker-host", help="HOST[:PORT] the worker reaches RabbitMQ on")
    create.add_argument("--redis-host", help="HOST[:PORT] the worker reaches Redis on")
    delete = admin.add_parser("delete-worker", help="remove a worker's users; it is cut off")
    delete.add_argument("name")

    db = sub.add_parser("db", help="the results database").add_subparsers(
        dest="db_command", required=True
    )
    upgrade = db.add_parser(
        "upgrade", help="create ml_results or upgrade it to this version (workers do on start)"
    )
    upgrade.add_argument(
        "--url",
        help="database URL (default: AVOCADO_DATABASE_URL, else the SQLite file); a password "
        "is safer in AVOCADO_DATABASE_URL than on a command line",
    )
    return parser


def _format_arg(raw: str | None) -> str | dict[str, Any] | None:
    if raw is None or raw == "json":
        return raw
    text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
    schema: dict[str, Any] = json.loads(text)
    return schema


def _submit(producer: Producer, args: argparse.Namespace) -> JobHandle[Any]:
    lane = Lane(args.lane) if args.lane else Lane.INTERACTIVE if args.wait else Lane.BATCH
    if args.command == "generate":
        messages = json.loads(args.messages.read_text()) if args.messages else None
        handle: JobHandle[Any] = producer.generate(
            args.prompt,
            messages=messages,
            model=args.model,
            system=args.system,
            options=dict(args.option),
            format=_format_arg(args.format),
            keep_alive=args.keep_alive,
            idempotency_key=args.idempotency_key,
            lane=lane,
        )
        _warn_unserved(producer, args.model or producer.settings.default_model)
        return handle
    if args.command == "embed":
        texts = args.texts or [line for line in sys.stdin.read().splitlines() if line.strip()]
        handle = producer.embed(
            texts,
            model=args.model,
            share_id=args.share_id,
            dimensions=args.dimensions,
            truncate=not args.no_truncate,
            keep_alive=args.keep_alive,
            idempotency_key=args.idempotency_key,
            lane=lane,
        )
        _warn_unserved(producer, args.model or producer.settings.embed_model)
        return handle
    text = args.text if args.text is not None else args.file.read_text()
    content = {"text": text, "title": args.title}
    options = {
        key: value
        for key, value in {
            "max_words": args.max_words,
            "language": args.language,
            "model": args.model,
        }.items()
        if value is not None
    }
    handle = producer.summarize(args.share_id, content, options=options, lane=lane)
    _warn_unserved(producer, args.model or producer.settings.default_model)
    return handle


def _warn_unserved(producer: Producer, model: str) -> None:
    """Say on stderr when no live node serves ``model``: its job waits for one that does."""
    registry = WorkerRegistry.from_settings(producer.settings)
    try:
        served = registry.served()
    except RedisError:
        return  # the submission itself says what is wrong
    finally:
        registry.close()
    if canonical_model(model) not in served:
        print(
            f"avocado: no live node serves {canonical_model(model)} yet: the job is queued "
            "and runs once a node that serves it joins",
            file=sys.stderr,
        )


def _show(result: JobResult, as_json: bool) -> None:
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    if isinstance(result, GenerateResult):
        print(result.text)
    elif isinstance(result, SummarizeResult):
        print(result.summary)
    elif isinstance(result, EmbedResult):
        print(json.dumps(result.embeddings))
    print(
        f"-- {result.kind.value} {result.job_id} on {result.worker}: model {result.model}, "
        f"{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens, "
        f"{result.total_duration_ms:.0f} ms",
        file=sys.stderr,
    )


def _topology(producer: Producer) -> None:
    with producer.app.connection_for_write() as connection:
        infos = describe(connection, producer.settings)
    for info in infos:
        args = ", ".join(f"{k}={v}" for k, v in sorted(info.arguments.items()))
        print(
            f"{info.name:<16} exchange={info.exchange:<8} key={info.routing_key:<15} "
            f"messages={info.messages:<5} consumers={info.consumers:<3} {args}"
        )


def _admin(args: argparse.Namespace) -> int:
    """Secrets go to stdout only, for the notebook's secret store; never to a log."""
    settings = Settings()
    if args.admin_command == "delete-worker":
        if not delete_worker(settings, args.name):
            raise AdminError(f"no worker user {args.name!r}")
        print(f"worker users {args.name!r} deleted; their connections are closed", file=sys.stderr)
        return 0
    made = create_worker(settings, args.name, args.broker_host, args.redis_host)
    print(
        f"worker users {made.name!r} ready. Put these in the notebook's secrets (they hold "
        "the password, shown only now):",
        file=sys.stderr,
    )
    for key, value in made.env().items():
        print(f"{key}={value}")
    return 0


def _db(args: argparse.Namespace) -> int:
    """By hand what a worker does on start, with rights to create tables that readers lack."""
    store = ResultStore.open(args.url) if args.url else ResultStore.from_settings(Settings())
    with store:
        store.migrate()
        print(f"{store!r}: ml_results at schema version {store.schema_version()}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "admin":
        return _admin(args)
    if args.command == "db":
        return _db(args)
    if args.command == "keys":
        return run_keys(args, Settings())
    if args.command == "batch":
        return run_batch(args, Settings())
    with Producer() as producer:
        if args.command == "topology":
            _topology(producer)
            return 0
        if args.command == "dlq":
            with producer.app.connection_for_write() as connection:
                return run_dlq(args, connection, app=producer.app)
        if args.command == "result":
            return _result(producer, args)
        if args.command == "endpoints":
            return _endpoints(producer, args)
        if args.command == "status":
            return _status(producer, args)
        handle = _submit(producer, args)
        if not args.wait:
            print(handle.id)
            return 0
        _show(handle.get(timeout=args.timeout), args.json)
        return 0


def _show_endpoint(endpoint: Endpoint, as_json: bool) -> None:
    event = endpoint.event.value if isinstance(endpoint, Announcement) else "live"
    if as_json:
        print(json.dumps({"event": event, **endpoint.model_dump(mode="json")}), flush=True)
        return
    print(
        f"{event:<8} {endpoint.service_id}  {endpoint.url}  auth={endpoint.auth}  "
        f"{endpoint.backend}={endpoint.version or '-'}  models={','.join(endpoint.models) or '-'}  "
        f"until={endpoint.expires_at:%H:%M:%S}",
        flush=True,
    )


def _endpoints(producer: Producer, args: argparse.Namespace) -> int:
    """The registry's live records, then (``--watch``) announcements until interrupted."""
    registry = NodeRegistry.from_settings(producer.settings)
    try:
        for endpoint in registry.live():
            _show_endpoint(endpoint, args.json)
    finally:
        registry.close()
    if not args.watch:
        return 0
    with (
        producer.app.connection_for_read() as connection,
        EndpointWatcher(connection, on_event=lambda a: _show_endpoint(a, args.json)) as watcher,
    ):
        while True:
            watcher.drain(1.0)


def _status(producer: Producer, args: argparse.Namespace) -> int:
    """Every part that can be read is shown; exit 1 when a part could not be."""
    status = collect(
        producer, dead_letters=args.dead_letters, failures=args.failures, timeout=args.timeout
    )
    print(render(status, as_json=args.json))
    return 0 if status.ok else 1


def _result(producer: Producer, args: argparse.Namespace) -> int:
    """The stored row when the job ended; else its live state, or its result once it ends."""
    results = producer.results
    if args.share_id is not None:
        kind = JobKind.EMBED if args.embedding else JobKind.SUMMARIZE
        row = results.get_by_key(job_key(kind, "", args.share_id))
        if row is None:
            raise NotFound(f"no {kind.value} of share id {args.share_id!r} stored")
    else:
        row = results.get(args.job_id)
    if row is not None and row.status is JobStatus.SUCCESS and row.result is not None:
        _show(parse_result(row.result), args.json)
        return 0
    if row is not None and row.status in (JobStatus.FAILURE, JobStatus.CANCELLED):
        raise JobFailed(row.job_id, str(row.error))
    handle = producer.handle(row.job_id if row is not None else args.job_id)
    if not args.wait:
        print(f"{handle.id} {row.status.value if row is not None else handle.state}")
        return 0
    _show(handle.get(timeout=args.timeout), args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``avocado`` command: one line on stderr and the error class's own
    exit code (``avocado_shared.errors``) when a command fails."""
    args = _parser().parse_args(argv)
    try:
        with _services_reached():
            return _run(args)
    except KeyboardInterrupt:
        return 130
    except AvocadoError as error:
        print(f"avocado: {error}", file=sys.stderr)
        return error.exit_code


@contextmanager
def _services_reached() -> Iterator[None]:
    """What the client libraries raise when the broker, Redis or a file cannot be reached
    (their own classes) is ``Unavailable``; a file that is not JSON is a bad request."""
    try:
        yield
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"not JSON: {error}") from error
    except (OperationalError, RedisError, OSError) as error:
        if isinstance(error, AvocadoError):
            raise
        raise Unavailable(str(error) or type(error).__name__) from error


if __name__ == "__main__":
    sys.exit(main())
