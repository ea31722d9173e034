"""Least-privilege credentials for one worker: a RabbitMQ user limited to what a worker does on
the fleet's vhost, and a Redis ACL user limited to the fleet's key prefix and the commands the
worker sends. A notebook's secrets are often readable by others; these limit what a leak costs.

RabbitMQ permissions are three regular expressions (configure, write, read) per vhost. Such a
user may not declare or delete the job queues (both need configure), so the admin declares the
topology here and workers run with ``declare_topology`` off. Purging needs only read, as
consuming does, so RabbitMQ cannot give a worker its jobs without also letting it purge them.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import redis
from kombu.connection import Connection
from pydantic import SecretStr

from avocado_shared.errors import PermanentError
from avocado_shared.settings import Settings
from avocado_shared.topology import (
    ML_EXCHANGE,
    declare_delayed_delivery,
    declare_topology,
    job_queues,
)

__all__ = [
    "WORKER_PERMISSIONS",
    "WORKER_TAG",
    "AdminError",
    "Management",
    "Permissions",
    "WorkerCredentials",
    "create_worker",
    "declare_worker_topology",
    "delete_worker",
    "redis_worker_rules",
]

# Celery's own entities: the worker's mailbox (celery.pidbox, <node>.celery.pidbox), replies
# to remote control (reply.celery.pidbox, <id>.reply.celery.pidbox) and task events (celeryev,
# turned on by Flower). A worker declares these itself; none holds jobs.
_CELERY = r"celery\.pidbox|reply\.celery\.pidbox|.+\.celery\.pidbox|celeryev|celeryev\..+"


@dataclass(frozen=True)
class Permissions:
    """A RabbitMQ user's configure, write and read expressions on one vhost."""

    configure: str
    write: str
    read: str


# The lane queues of each model (ml.model.<model>.<lane>): a worker declares those of the
# models its server serves as they come, and binds them to ml and to Celery's delayed delivery.
_LANES = r"ml\.model\.[^#*\s]+"  # no wildcard: a model name has none

WORKER_PERMISSIONS = Permissions(
    configure=rf"^({_LANES}|{_CELERY})$",
    # ml: retries, forwarded jobs and the producer API; ml.dlx: poison messages;
    # celery_delayed_27: retries with a countdown (Celery's native delayed delivery enters at
    # its top level).
    write=rf"^(ml|ml\.dlx|service-discovery|celery_delayed_27|{_LANES}|{_CELERY})$",
    read=(
        rf"^(ml|ml\.generate|ml\.summarize|ml\.embed|infra\.announce|celery_delayed_delivery"
        rf"|{_LANES}|{_CELERY})$"
    ),
)
# Binding keys a worker may bind to ``ml`` (a topic permission's read, checked on
# queue.bind): its models' lane queues only (Celery's delayed delivery adds ``#.<key>``), never
# ``#`` (every job, copied).
WORKER_ML_BINDINGS = rf"^(#\.)?{_LANES}$"
WORKER_TAG = "avocado-worker"

# Every command a worker and a producer on its credentials send: what Redis counted (INFO
# commandstats) while tests/integration/test_admin.py ran jobs, retries, announcements and
# the re-announce job (HKEYS, MGET, EVALSHA, SCRIPT LOAD); that test fails on any refusal.
# CLIENT SETINFO (Redis 7.2+) stays refused: redis-py ignores its error.
_REDIS_COMMANDS = (
    "ping",
    "get",
    "mget",
    "set",
    "setex",
    "del",
    "expire",
    "exists",
    "hget",
    "hset",
    "hdel",
    "hkeys",
    "sadd",  # the models jobs were queued for (avocado_shared.routing.WANTED_MODELS)
    "smembers",
    "xadd",  # job token streams (avocado_shared.streams)
    "xrange",
    "eval",
    "evalsha",
    "script|load",
    "multi",
    "exec",
    "publish",
    "subscribe",
    "unsubscribe",
)

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class AdminError(PermanentError):
    """The broker or Redis refused an administrative step, or a name is not allowed."""


@dataclass(frozen=True)
class WorkerCredentials:
    """What a worker of this user puts in its secrets; ``env()`` holds its passwords."""

    name: str
    broker_url: SecretStr
    redis_url: SecretStr
    key_prefix: str

    def env(self) -> dict[str, str]:
        """The ``AVOCADO_*`` variables of such a worker."""
        return {
            "AVOCADO_BROKER_URL": self.broker_url.get_secret_value(),
            "AVOCADO_REDIS_URL": self.redis_url.get_secret_value(),
            "AVOCADO_KEY_PREFIX": self.key_prefix,
            "AVOCADO_DECLARE_TOPOLOGY": "false",
        }


def redis_worker_rules(key_prefix: str) -> list[str]:
    """``ACL SETUSER`` rules: keys and channels under the prefix, the worker's commands only."""
    pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in key_prefix) + "*"
    return [f"~{pattern}", f"&{pattern}", "-@all", *(f"+{c}" for c in _REDIS_COMMANDS)]


class Management:
    """RabbitMQ's management HTTP API, with the admin's credentials (stdlib only)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise AdminError(f"management API URL must be http(s)://, not {parts.scheme}://")
        self._base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}/api"
        login = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        self._auth = "Basic " + base64.b64encode(login.encode()).decode()
        self._timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> Management:
        """``rabbitmq_management_url``, else the first broker's host on port 15672 with its
        credentials over HTTP (HTTPS when the broker URL is ``amqps://``)."""
        if settings.rabbitmq_management_url is not None:
            return cls(settings.rabbitmq_management_url.get_secret_value())
        broker = Connection(settings.broker_url.get_secret_value().split(";")[0])
        scheme = "https" if broker.ssl else "http"
        login = f"{quote(broker.userid or '', safe='')}:{quote(broker.password or '', safe='')}"
        return cls(f"{scheme}://{login}@{broker.hostname}:15672")

    def _call(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        # S310: the URL is http(s), checked in __init__.
        request = urllib.request.Request(self._base + path, data=data, method=method)  # noqa: S310
        request.add_header("Authorization", self._auth)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                raw = response.read()
        except urllib.error.HTTPError as error:
            if error.code == 404 and method in ("GET", "DELETE"):
                return None
            detail = error.read().decode(errors="replace")[:300]
            raise AdminError(f"management API {method} {path}: {error.code} {detail}") from None
        except OSError as error:
            raise AdminError(f"management API at {self._base} unreachable: {error}") from None
        return json.loads(raw) if raw else {}

    def user_tags(self, name: str) -> list[str] | None:
        """The user's tags, ``None`` when there is no such user."""
        user = self._call("GET", f"/users/{quote(name, safe='')}")
        if not isinstance(user, dict):
            return None
        tags = user.get("tags") or []
        return tags.split(",") if isinstance(tags, str) else list(tags)

    def put_user(self, name: str, password: str, tags: str) -> None:
        self._call("PUT", f"/users/{quote(name, safe='')}", {"password": password, "tags": tags})

    def put_permissions(self, vhost: str, name: str, permissions: Permissions) -> None:
        path = f"/permissions/{quote(vhost, safe='')}/{quote(name, safe='')}"
        self._call("PUT", path, permissions.__dict__)

    def put_topic_permissions(
        self, vhost: str, name: str, exchange: str, *, write: str, read: str
    ) -> None:
        path = f"/topic-permissions/{quote(vhost, safe='')}/{quote(name, safe='')}"
        self._call("PUT", path, {"exchange": exchange, "write": write, "read": read})

    def delete_user(self, name: str) -> bool:
        """Delete the user (its connections close); False when there was none."""
        return self._call("DELETE", f"/users/{quote(name, safe='')}") is not None


def declare_worker_topology(connection: Connection, settings: Settings) -> None:
    """Everything a worker would declare at start but a least-privilege one may not: the
    fleet's topology and Celery's delayed-delivery exchanges, queues and bindings."""
    declare_topology(connection, settings)
    declare_delayed_delivery(connection, job_queues(settings))


def _with_login(url: str, user: str, password: str, host: str | None) -> str:
    parts = urlsplit(url)
    netloc = host or f"{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=f"{quote(user, safe='')}:{password}@{netloc}").geturl()


def _check_name(name: str, management: Management) -> None:
    """Refuse a bad name, and rotating the password of a user this command did not make."""
    if not _NAME.match(name) or name == "default":
        raise AdminError(
            f"worker name {name!r}: lower-case letters, digits, '.', '_', '-' (not 'default')"
        )
    tags = management.user_tags(name)
    if tags is not None and WORKER_TAG not in tags:
        raise AdminError(f"RabbitMQ user {name!r} exists and is not a worker user: refused")


def create_worker(
    settings: Settings, name: str, broker_host: str | None = None, redis_host: str | None = None
) -> WorkerCredentials:
    """Declare the topology, then create (or give a new password to) the worker's RabbitMQ and
    Redis users; ``*_host`` is ``host[:port]`` as the worker reaches it, when not the admin's."""
    management = Management.from_settings(settings)
    _check_name(name, management)
    broker_url = settings.broker_url.get_secret_value().split(";")[0]
    with Connection(broker_url) as connection:
        connection.ensure_connection(max_retries=2)
        declare_worker_topology(connection, settings)
        vhost = connection.virtual_host
    password = secrets.token_urlsafe(24)
    management.put_user(name, password, WORKER_TAG)
    management.put_permissions(vhost, name, WORKER_PERMISSIONS)
    management.put_topic_permissions(
        vhost, name, ML_EXCHANGE.name, write=".*", read=WORKER_ML_BINDINGS
    )
    redis_url = settings.redis_url.get_secret_value()
    client = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        rules = redis_worker_rules(settings.key_prefix)
        client.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)
    except redis.RedisError as error:
        raise AdminError(f"Redis ACL SETUSER {name}: {error}") from None
    finally:
        client.close()
    return WorkerCredentials(
        name=name,
        broker_url=SecretStr(_with_login(broker_url, name, password, broker_host)),
        redis_url=SecretStr(_with_login(redis_url, name, password, redis_host)),
        key_prefix=settings.key_prefix,
    )


def delete_worker(settings: Settings, name: str) -> bool:
    """Remove the worker's users from RabbitMQ and Redis; False when neither existed."""
    management = Management.from_settings(settings)
    _check_name(name, management)
    had_broker_user = management.delete_user(name)
    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_timeout=10, socket_connect_timeout=5
    )
    try:
        had_redis_user = bool(client.acl_deluser(name))
    except redis.RedisError as error:
        raise AdminError(f"Redis ACL DELUSER {name}: {error}") from None
    finally:
        client.close()
    return had_broker_user or had_redis_user
