"""One error root: every failure the fleet raises on purpose is an ``AvocadoError``, either
transient or permanent, and the CLI ends with a distinct exit code per kind."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from celery.exceptions import Retry

import avocado_shared
import ollama_worker
from avocado_shared import cli
from avocado_shared.contracts import InvalidRequest
from avocado_shared.dlq import DeadLetterNotFound
from avocado_shared.errors import AvocadoError, PermanentError, TransientError, Unavailable
from avocado_shared.jobs import JobFailed, NotFinished, PublishError, PublishOutcomeUnknown
from ollama_worker.leases import AlreadyRunning


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for package in (avocado_shared, ollama_worker):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if ".testing" in info.name or ".migrations" in info.name:
                continue
            module = importlib.import_module(info.name)
            found += [
                value
                for value in vars(module).values()
                if inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == info.name
            ]
    return found


def test_every_error_of_both_packages_is_transient_or_permanent() -> None:
    classes = _exception_classes()
    assert len(classes) >= 20
    stray = [c for c in classes if not issubclass(c, AvocadoError)]
    assert stray == []
    either = (TransientError, PermanentError)
    # Bases of a family (never raised themselves), and a signal inside the producer.
    not_raised = {"AvocadoError", "StoreError", "SentUnconfirmed"}
    unsorted = [c for c in classes if not issubclass(c, either) and c.__name__ not in not_raised]
    assert unsorted == []


def test_each_kind_has_its_own_exit_code() -> None:
    kinds = {
        PermanentError: 1,
        InvalidRequest: 2,
        JobFailed: 3,
        DeadLetterNotFound: 4,
        Unavailable: 69,
        PublishError: 69,
        TransientError: 75,
        PublishOutcomeUnknown: 75,
        NotFinished: 124,
    }
    assert {kind: kind.exit_code for kind in kinds} == kinds


def test_the_cli_ends_with_the_code_of_the_error_and_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["generate", "--option", "temperature=2", "--model", "", "hi"])
    assert code == InvalidRequest.exit_code
    err = capsys.readouterr().err
    assert err.startswith("avocado: ")
    assert len(err.strip().splitlines()) == 1


def test_a_copy_turned_away_stays_itself_through_celerys_retry() -> None:
    """Celery's retry keeps an exception as the nearest class that survives pickling; the
    worker's ``on_retry`` tells a copy turned away (whose row is the running copy's) by type."""
    kept = Retry(exc=AlreadyRunning("job-1", 11)).exc

    assert isinstance(kept, AlreadyRunning)
    assert (kept.job_id, kept.retry_in) == ("job-1", 11)
    assert str(kept) == "job job-1 is running elsewhere; this copy is back in 11s"
