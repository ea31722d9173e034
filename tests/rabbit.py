"""RabbitMQ brokers of the tests: the machine's 3.x, the suite's 4.x node, and private nodes that
a test may restart, kill, give TLS listeners or cluster (scripts/rabbitmq-node.sh runs them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp.exceptions
from kombu.connection import Connection

from avocado_shared import Producer
from avocado_shared.routing import Lane, lane_queue_name
from tests.processes import process_runs
from tests.services import free_port, wait_for

# What a job names when it names no model (Settings.default_model).
DEFAULT_MODEL = "llama3.2:1b"
_PRIVATE = "avocado-test-"  # the names of private nodes: this, their process's id, a nonce

__all__ = [
    "ALARMS",
    "DEFAULT_MODEL",
    "NODE_SCRIPT",
    "Broker",
    "RabbitNode",
    "alarm_raised",
    "isolated_vhost",
    "lane_queue",
    "machine_broker",
    "new_vhost",
    "purge",
    "queue_depth",
    "rabbitmq4",
]

NODE_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq-node.sh"
_CTL_TIMEOUT = 120
# (raise it, clear it, the reason RabbitMQ gives in connection.blocked)
ALARMS = {
    "memory": (
        ("set_vm_memory_high_watermark", "0.00001"),
        ("set_vm_memory_high_watermark", "0.4"),
        "low on memory",
    ),
    "disk": (
        ("set_disk_free_limit", "1000000GB"),
        ("set_disk_free_limit", "50MB"),
        "low on disk",
    ),
}


def _run(args: list[str], what: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=_CTL_TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed: {done.stderr or done.stdout}")
    return done.stdout


@dataclass(frozen=True)
class Broker:
    """A RabbitMQ the tests connect to: where it listens and how to administer it."""

    label: str  # "rabbitmq3" or "rabbitmq4": the test id
    host: str  # host:port of its AMQP listener
    node: RabbitNode | None = None  # None: the machine's own broker, run by its service

    @property
    def major(self) -> int:
        return 4 if self.label == "rabbitmq4" else 3

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl ARGS`` against this broker."""
        if self.node is not None:
            return self.node.ctl(*args)
        exe = shutil.which("rabbitmqctl")
        if exe is None:
            raise RuntimeError(
                "rabbitmqctl not found: run scripts/test.sh, which installs RabbitMQ"
            )
        return _run([exe, "-q", *args], f"rabbitmqctl {' '.join(args)}")

    def add_vhosts(self, *vhosts: str) -> None:
        """Make ``vhosts``, guest allowed everything in them, in one rabbitmqctl run: its Erlang
        VM is most of a call's cost, and the suite makes a vhost per session and broker."""
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        self._define(
            {
                "vhosts": [{"name": vhost} for vhost in vhosts],
                "permissions": [
                    {"user": "guest", "vhost": vhost, **everything} for vhost in vhosts
                ],
            }
        )

    def _define(self, definitions: dict[str, Any]) -> None:
        """Import ``definitions``, through a file: rabbitmqctl 4.0 hangs reading stdin."""
        directory = self.node.root() / "tmp" if self.node is not None else None
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=directory) as file:
            json.dump(definitions, file)
            file.flush()
            os.chmod(file.name, 0o644)  # the machine's rabbitmqctl runs as user rabbitmq
            path = self.node.path_in_node(Path(file.name)) if self.node else file.name
            self.ctl("import_definitions", path)

    def version(self) -> str:
        """The RabbitMQ version the broker gives a client that connects."""
        with Connection(self.url("/")) as connection:
            return str(connection.connection.server_properties["version"])

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        """Each queue of ``vhost``: its ``type`` and its ``arguments`` as a dict."""
        listing = self.ctl(
            "list_queues", "-p", vhost, "name", "type", "arguments", "--formatter", "json"
        )
        return {
            q["name"]: {
                "type": q["type"],
                "arguments": {key: value for key, _type, value in q["arguments"]},
            }
            for q in json.loads(listing)
        }

    def url(self, vhost: str, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@{self.host}/{vhost}"


@dataclass(frozen=True)
class RabbitNode:
    """One node run by scripts/rabbitmq-node.sh: RabbitMQ ``version`` 3 (the machine's
    rabbitmq-server) or 4 (the Debian 13 root), with its own name, ports and data."""

    version: int
    name: str
    port: int
    dist_port: int | None = None  # None: port + 20000
    mgmt_port: int | None = None

    @classmethod
    def private(
        cls, version: int, port: int, dist_port: int | None = None, mgmt_port: int | None = None
    ) -> RabbitNode:
        """A node no other test uses, to stop, kill or reconfigure at will. Its name holds this
        process's id: a session that finds the process gone wipes it (``wipe_orphans``)."""
        name = f"{_PRIVATE}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return cls(version, name, port, dist_port or free_port(), mgmt_port)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def node_name(self) -> str:
        return f"{self.name}@localhost"

    def broker(self) -> Broker:
        return Broker(f"rabbitmq{self.version}", self.host, self)

    def _script(self, action: str, *args: str) -> str:
        command = [str(NODE_SCRIPT), action, "--name", self.name, "--port", str(self.port)]
        if self.version == 3:
            command.append("--v3")
        if self.dist_port is not None:
            command += ["--dist-port", str(self.dist_port)]
        if self.mgmt_port is not None:
            command += ["--mgmt-port", str(self.mgmt_port)]
        return _run([*command, *args], f"rabbitmq-node.sh {action} {self.name}")

    def start(self, conf: str | None = None) -> RabbitNode:
        """Start it (``conf``: lines added to its rabbitmq.conf) and wait until it serves AMQP."""
        if conf is None:
            self._script("start")
            return self
        config = self.data_dir().parent / f"{self.name}.extra.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(conf)
        try:
            self._script("start", "--conf", str(config))
        finally:
            config.unlink(missing_ok=True)
        return self

    @contextmanager
    def running(self, conf: str | None = None) -> Iterator[RabbitNode]:
        """Started (``conf`` as for ``start``), then killed and its data deleted."""
        try:
            yield self.start(conf)
        finally:
            self.wipe()

    def kill(self) -> None:
        """SIGKILL the node's VM, as when its machine vanishes."""
        self._script("kill")

    def wipe(self) -> None:
        """Kill it and delete its data (a clean stop would only cost time)."""
        self._script("wipe")

    def data_dir(self) -> Path:
        """Its data directory on this machine; files its config names go here."""
        return Path(self._script("dir").strip())

    def root(self) -> Path:
        """The file system root the node runs in: the Debian 13 root for RabbitMQ 4."""
        if self.version == 3:
            return Path("/")
        return Path(os.environ.get("AVOCADO_RABBITMQ4_ROOT", "/var/cache/spicy-avocado/rabbitmq4"))

    def path_in_node(self, path: Path) -> str:
        """How the node itself names ``path``, a file inside ``root()``."""
        return "/" + str(path.relative_to(self.root()))

    def ctl(self, *args: str) -> str:
        return self._script("ctl", "--", *args)

    def diagnostics(self, *args: str) -> str:
        """``rabbitmq-diagnostics ARGS`` against it (``alarms``, ``status``...)."""
        return self._script("diagnostics", "--", *args)


def wipe_orphans() -> list[str]:
    """Wipe the private nodes whose test process is gone: one killed (SIGKILL, or SIGTERM,
    which skips Python's cleanup) never ran its fixtures' wipe, and its nodes would go on
    holding ports, memory and a little CPU (enough to skew a benchmark). Their names."""
    wiped = []
    for version in (3, 4):
        nodes = RabbitNode(version, "any", 0).data_dir().parent
        for data in sorted(nodes.glob(f"{_PRIVATE}*")):
            found = re.fullmatch(rf"{_PRIVATE}(\d+)-[0-9a-f]{{6}}", data.name)
            if found is not None and not process_runs(int(found[1])):
                RabbitNode(version, data.name, 0).wipe()
                wiped.append(data.name)
    return wiped


def machine_broker() -> Broker:
    """The machine's own RabbitMQ (3.x here), which tests never restart."""
    return Broker("rabbitmq3", os.environ.get("AVOCADO_TEST_RABBIT_HOST", "127.0.0.1:5672"))


def rabbitmq4() -> Broker:
    """The suite's RabbitMQ 4 node (scripts/test.sh starts it; started here when it is not)."""
    port = int(os.environ.get("AVOCADO_TEST_RABBIT4_PORT", "5673"))
    return RabbitNode(4, "avocado4", port).start().broker()


def new_vhost(broker: Broker) -> str:
    """A fresh vhost, left in place: for a private node, whose data goes when it is wiped (a
    ``delete_vhost`` would only cost another rabbitmqctl VM). Its broker URL."""
    vhost = f"avocado-test-{uuid.uuid4().hex[:8]}"
    broker.add_vhosts(vhost)
    return broker.url(vhost)


@contextmanager
def isolated_vhost(broker: Broker) -> Iterator[str]:
    """A fresh vhost for one test session, removed afterwards; yields its broker URL."""
    url = new_vhost(broker)
    try:
        yield url
    finally:
        broker.ctl("delete_vhost", url.rsplit("/", 1)[1])


def _alarmed(node: RabbitNode) -> bool:
    return "alarm on node" in node.diagnostics("alarms")


@contextmanager
def alarm_raised(node: RabbitNode, alarm: str) -> Iterator[str]:
    """RabbitMQ's ``alarm`` (a key of ``ALARMS``) in effect on ``node``, so that it blocks
    publishers; yields the reason it gives them. Cleared, and awaited cleared, on exit."""
    raise_it, clear_it, reason = ALARMS[alarm]
    node.ctl(*raise_it)
    try:
        wait_for(lambda: _alarmed(node), timeout=30, what=f"the {alarm} alarm")
        yield reason
    finally:
        node.ctl(*clear_it)
    wait_for(lambda: not _alarmed(node), timeout=30, what=f"the {alarm} alarm to clear")


def queue_depth(producer: Producer, queue: str) -> int:
    """How many messages ``queue`` holds ready, on ``producer``'s broker and vhost; none
    before it is declared (the first job sent to it declares it)."""
    with producer.app.connection_for_write() as connection:
        try:
            declared = connection.default_channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return 0
        return int(declared.message_count)


def lane_queue(lane: Lane = Lane.BATCH, model: str = DEFAULT_MODEL) -> str:
    """The lane queue a job for ``model`` (the tests' default model) is published to: batch
    from the Python producer, interactive from the gateway."""
    return lane_queue_name(model, lane)


def purge(producer: Producer, *queues: str) -> None:
    """Empty ``queues``: jobs a test left for a model no node serves would make a later
    test's node that may pull take that model on."""
    with producer.app.connection_for_write() as connection:
        for queue in queues:
            connection.default_channel.queue_purge(queue)
