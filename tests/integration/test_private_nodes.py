"""Private RabbitMQ nodes a killed test session left running are wiped by the next one."""

from __future__ import annotations

import subprocess
import uuid

from tests.processes import process_runs
from tests.rabbit import RabbitNode, wipe_orphans
from tests.services import free_port


def test_a_node_whose_test_process_is_gone_is_wiped_and_a_live_ones_kept() -> None:
    name = f"avocado-test-{_exited_pid()}-{uuid.uuid4().hex[:6]}"
    orphan = RabbitNode(3, name, free_port(), free_port())
    ours = RabbitNode.private(3, free_port())
    try:
        orphan.start()
        ours.data_dir().mkdir(parents=True)  # its files, as a node of a running session has
        vm = int((orphan.data_dir() / "pid").read_text())
        wiped = wipe_orphans()

        assert orphan.name in wiped
        assert ours.name not in wiped
        assert not process_runs(vm)
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
