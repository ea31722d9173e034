"""``avocado keys create|list|revoke``: the HTTP gateway's API keys from a shell.

A new key's secret goes to stdout alone (``KEY=$(avocado keys create web)``) and nowhere else:
not to a log, not to ``list``, not to Redis, which keeps its digest (``avocado_shared.keys``).
"""

from __future__ import annotations

import argparse
import json
import sys

from avocado_shared.keys import ApiKey, KeyStore
from avocado_shared.routing import Lane
from avocado_shared.settings import Settings

__all__ = ["add_keys_parser", "run_keys"]


def _limit(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a limit is 1 or more (leave it out for none): {text}")
    return value


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``avocado keys ...`` to the ``avocado`` command."""
    keys = sub.add_parser("keys", help="API keys of the HTTP gateway (avocado-infer)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser(
        "create", help="make a key and print its secret on stdout (shown only now)"
    )
    create.add_argument("name", help="the key's name, for list, revoke and the gateway's logs")
    create.add_argument("--rpm", type=_limit, default=0, help="requests a minute (default: any)")
    create.add_argument(
        "--concurrency", type=_limit, default=0, help="requests at once (default: any)"
    )
    create.add_argument(
        "--lane",
        choices=[lane.value for lane in Lane],
        default=Lane.INTERACTIVE.value,
        help="the lane of the key's requests unless one says X-Avocado-Lane (default: "
        "interactive; batch for a key that feeds bulk work)",
    )
    create.add_argument(
        "--admin",
        action="store_true",
        help="the key sees and cancels every job (GET/DELETE /jobs/{id}), not only its own",
    )
    listing = actions.add_parser("list", help="the live keys and their limits, never secrets")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser("revoke", help="delete a key; its next request gets a 401")
    revoke.add_argument("name")


def _limits(key: ApiKey) -> str:
    rpm = f"{key.rpm}/min" if key.rpm else "any"
    concurrency = str(key.concurrency) if key.concurrency else "any"
    admin = " admin" if key.admin else ""
    return f"rpm={rpm} concurrency={concurrency} lane={key.lane.value}{admin}"


def _show(keys: list[ApiKey], as_json: bool) -> None:
    if as_json:
        print(json.dumps([key.to_json() for key in keys], indent=2))
        return
    for key in keys:
        print(f"{key.name:<24} {_limits(key)}  created {key.created_at:%Y-%m-%d %H:%M}")


def run_keys(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``avocado keys ...``; a name taken (``KeyExists``) or unknown (``NotFound``) raise."""
    with KeyStore.from_settings(settings) as store:
        if args.keys_command == "create":
            key, secret = store.create(
                args.name,
                rpm=args.rpm,
                concurrency=args.concurrency,
                lane=Lane(args.lane),
                admin=args.admin,
            )
            print(
                f"key {key.name!r} made ({_limits(key)}); its secret, on stdout, is shown only "
                "now: send it as 'Authorization: Bearer <secret>'",
                file=sys.stderr,
            )
            print(secret)
        elif args.keys_command == "list":
            _show(store.list(), args.json)
        else:
            store.revoke(args.name)
            print(f"key {args.name!r} revoked", file=sys.stderr)
    return 0
