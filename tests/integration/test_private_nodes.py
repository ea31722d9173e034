"""Private RabbitMQ nodes a killed test session left running are wiped by the next one."""

from __future__ import annotations

import socket
import subprocess
import uuid

from tests.rabbit import RabbitNode, wipe_orphans
from tests.services import free_port


def _serves(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_node_whose_test_process_is_gone_is_wiped_and_a_live_ones_kept() -> None:
    name = f"avocado-test-{_exited_pid()}-{uuid.uuid4().hex[:6]}"
    orphan = RabbitNode(3, name, free_port(), free_port())
    ours = RabbitNode.private(3, free_port())
    try:
        orphan.start()
        ours.data_dir().mkdir(parents=True)  # its files, as a node of a running session has
        wiped = wipe_orphans()

        assert orphan.name in wiped
        assert ours.name not in wiped
        assert not _serves(orphan.port)
        assert not orphan.data_dir().exists()
        assert ours.data_dir().exists()
    finally:
        orphan.wipe()
        ours.wipe()


def _exited_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
