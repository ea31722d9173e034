"""The overrides of Celery, kombu, py-amqp and celery-singleton internals stay in their two
packages and in the index a maintainer reads on an upgrade; the worker closes the lock store
it gave celery-singleton."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import avocado_shared
import ollama_worker
import ollama_worker.overrides
from avocado_shared.topology import GENERATE_TASK, SUMMARIZE_TASK
from ollama_worker.celery_app import create_app
from ollama_worker.resources import Resources
from tests.inprocess import given_settings

_LIBRARIES = ("celery", "kombu", "amqp", "billiard", "celery_singleton")
# Public extension points, used as documented: no internals changed.
_PUBLIC = {
    "ollama_worker.celery_app.WorkerApp",
    "ollama_worker.lifecycle.Lifecycle",
    "ollama_worker.serving.FollowModels",
}


def _library_subclasses() -> set[str]:
    """Every class of the two packages built directly on a class of Celery's libraries."""
    found = set()
    for package in (avocado_shared, ollama_worker):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            loaded = importlib.import_module(module.name)
            for cls in vars(loaded).values():
                if not inspect.isclass(cls) or cls.__module__ != module.name:
                    continue
                library = any(b.__module__.split(".")[0] in _LIBRARIES for b in cls.__bases__)
                if library and not issubclass(cls, BaseException):
                    found.add(f"{cls.__module__}.{cls.__name__}")
    return found


def test_every_override_is_in_an_overrides_package() -> None:
    index = ollama_worker.overrides.__doc__ or ""
    overrides = _library_subclasses() - _PUBLIC
    assert overrides
    for name in overrides:
        assert ".overrides." in name, f"{name} overrides library internals outside overrides/"
        assert name.rsplit(".", 1)[-1] in index, f"{name} is missing from the overrides index"
    for test in {line.strip().split(" ")[0] for line in index.splitlines() if "::" in line}:
        path, _, function = test.partition("::")
        source = (Path(__file__).parents[1] / path).read_text()
        assert f"def {function}(" in source, f"the index names a test that does not exist: {test}"


def test_a_stopped_worker_closes_its_lock_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = given_settings({"AVOCADO_SQLITE_PATH": str(tmp_path / "results.sqlite3")})
    app = create_app(settings)
    app.resources = resources = Resources(app, settings)
    store = resources.lock_store()
    assert app.tasks[GENERATE_TASK].singleton_backend is store
    assert app.tasks[SUMMARIZE_TASK].singleton_backend is store
    closed: list[bool] = []
    monkeypatch.setattr(store.redis, "close", lambda: closed.append(True))
    resources.close()
    assert closed == [True]


def test_a_worker_leaves_httpx_s_command_line_out() -> None:
    """The worker's app made in a fresh process: httpx loaded without its command line, whose
    libraries (rich here: the test tools bring it) stay out of the worker's memory."""
    script = (
        "import sys, ollama_worker; ollama_worker.app; import httpx; "
        "print(sorted(m for m in ('httpx', 'httpx._main', 'rich') if sys.modules.get(m)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )

    assert done.stdout.split("\n")[-2] == "['httpx']"
