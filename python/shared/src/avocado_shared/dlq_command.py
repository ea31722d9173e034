"""``avocado dlq list`` and ``avocado dlq replay``: the dead-letter queue from a shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from celery import Celery
from kombu.connection import Connection

from avocado_shared.dlq import list_dead_letters, replay

__all__ = ["add_dlq_parser", "run_dlq"]


def add_dlq_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``avocado dlq list`` and ``avocado dlq replay`` to the ``avocado`` command."""
    dlq = sub.add_parser("dlq", help="inspect and replay dead-lettered jobs (ml.dead-letter)")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = actions.add_parser("list", help="show dead letters without removing them")
    listing.add_argument("--limit", type=int, default=100, help="show at most this many")
    listing.add_argument("--json", action="store_true", help="print JSON")
    again = actions.add_parser("replay", help="re-publish one where it was going")
    again.add_argument("id", help="the task id (or message id) that `dlq list` shows")
    again.add_argument("--body", type=Path, help="a file with a corrected JSON body ('-': stdin)")


def run_dlq(args: argparse.Namespace, connection: Connection, *, app: Celery | None = None) -> int:
    """Run ``avocado dlq ...``; ``app`` lets a replay forget the job's failed result. A letter
    not found (``DeadLetterNotFound``), a replay refused or a bad body raise, for the CLI."""
    if args.dlq_command == "list":
        letters = list_dead_letters(connection, limit=args.limit)
        if args.json:
            print(json.dumps([letter.to_json() for letter in letters], indent=2))
            return 0
        for letter in letters:
            print(
                f"{letter.id}  {letter.task or '-'}  deaths={letter.deaths}  "
                f"{letter.dead_lettered_at or '-'}  "
                f"{letter.original_exchange or '(default)'}/{letter.original_routing_key}  "
                f"{letter.reason}"
            )
        return 0
    body = None
    if args.body is not None:
        body = sys.stdin.buffer.read() if str(args.body) == "-" else args.body.read_bytes()
    letter = replay(connection, args.id, body=body, app=app)
    where = f"{letter.original_exchange or '(default)'}/{letter.original_routing_key}"
    print(f"replayed {letter.id} to {where}")
    return 0
