"""The gateway's web page (``/ui``) in a real browser (``tests/browser.py``): headless
Chromium driven by Selenium, against a real gateway, broker, Redis and a worker on a simulator
that streams 20 tokens a second, so an answer is seen arriving, and can be stopped, before it
ends. Its worker SIGKILLed mid-answer: test_ui_preemption.py."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest
from kombu.connection import Connection
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as seen

from avocado_shared import JobStatus, Producer, Settings
from avocado_shared.fleet import WorkerRecord, WorkerRegistry
from avocado_shared.keys import KeyStore
from avocado_sim import OllamaSimulator, SimConfig
from tests.browser import ask, ended, screenshot, sign_in, until
from tests.dead_letters import put_dead_letter
from tests.gateway import InProcessGateway
from tests.infer_http import MODEL, Gateways, unique
from tests.inprocess import InProcessWorker

TOKENS = 60  # at 20 tokens a second: 3 s an answer
ASK = "Tell me about avocados."


@pytest.fixture(scope="module")
def sim() -> Iterator[OllamaSimulator]:
    """The module's simulator (the ``worker`` fixture's), slow enough to watch."""
    with OllamaSimulator(SimConfig(models=[MODEL], default_tokens=TOKENS, tokens_per_s=20)) as s:
        yield s


@pytest.fixture
def gateway(gateway_factory: Gateways, worker: InProcessWorker) -> InProcessGateway:
    """A gateway that asks for API keys, before the module's worker."""
    return gateway_factory(require_keys=True)


def test_a_key_signs_in_and_an_answer_streams_in_with_its_node_attempts_and_speed(
    browser: Chrome,
    gateway: InProcessGateway,
    keys: KeyStore,
    worker: InProcessWorker,
    producer: Producer,
) -> None:
    _, secret = keys.create(unique("ui"))
    browser.get(f"{gateway.url}/ui")
    assert browser.find_element(By.ID, "view-chat").is_displayed() is False
    browser.find_element(By.ID, "key").send_keys("avk_" + "w" * 43)
    browser.find_element(By.ID, "sign-in").click()
    refusal = until(browser, seen.text_to_be_present_in_element((By.ID, "sign-in-error"), "key"))
    assert refusal
    screenshot(browser, "ui-sign-in")
    assert browser.execute_script("return sessionStorage.length") == 0

    browser.find_element(By.ID, "key").clear()
    sign_in(browser, gateway.url, secret)
    assert secret not in browser.current_url
    assert browser.execute_script("return Object.values(sessionStorage)") == [secret]

    box = ask(browser, MODEL, ASK)
    text = box.find_element(By.CLASS_NAME, "text")
    # Streamed: text is on the page while the answer is still being written.
    until(browser, lambda _: text.text and "streaming" in str(box.get_attribute("class")))
    partial = text.text
    until(browser, ended(box))
    screenshot(browser, "ui-chat")

    job_id = str(box.get_attribute("data-job-id"))
    row = producer.results.get(job_id)
    assert row is not None
    assert row.status is JobStatus.SUCCESS
    assert row.result is not None
    assert text.text == row.result["text"]
    assert len(partial) < len(text.text)
    meta = box.find_element(By.CLASS_NAME, "meta")
    assert meta.get_attribute("data-worker") == row.worker == worker.name
    assert meta.get_attribute("data-attempts") == "1"
    print(f"answer meta: {meta.text!r}")
    assert f"node {worker.name}" in meta.text
    assert "1 attempt" in meta.text
    assert "tokens/s" in meta.text


def test_the_fleet_view_shows_the_node_its_model_and_to_an_admin_failures_and_dead_letters(
    browser: Chrome,
    gateway: InProcessGateway,
    keys: KeyStore,
    worker: InProcessWorker,
    sim: OllamaSimulator,
    broker_url: str,
) -> None:
    _, plain = keys.create(unique("ui"))
    _, admin = keys.create(unique("ui-admin"), admin=True)
    node = (By.CSS_SELECTOR, f'#nodes tr[data-worker="{worker.name}"]')

    sign_in(browser, gateway.url, plain)
    browser.find_element(By.ID, "tab-fleet").click()
    row = until(browser, seen.visibility_of_element_located(node))
    assert MODEL in row.text  # type: ignore[attr-defined]
    assert browser.find_element(By.ID, "admin-note").is_displayed()
    assert not browser.find_element(By.ID, "failures").is_displayed()

    browser.find_element(By.ID, "sign-out").click()
    until(browser, seen.visibility_of_element_located((By.ID, "view-sign-in")))
    assert browser.execute_script("return sessionStorage.length") == 0
    sign_in(browser, gateway.url, admin)
    sim.config.fail_status, sim.config.fail_first = 400, 1  # the server refuses the next one
    try:
        box = ask(browser, MODEL, "Refuse this one.")
        until(browser, lambda _: box.get_attribute("data-ended") == "failed")
    finally:
        sim.config.fail_first = 0
    why = box.find_element(By.CLASS_NAME, "why").text
    print(f"a refused answer on the page: {why!r}; its line: {box.text.splitlines()[-1]!r}")
    assert why
    assert "failed" in str(box.get_attribute("class"))

    reason = unique("rejected: the page's test")
    with Connection(broker_url) as connection:
        put_dead_letter(connection, reason)
    browser.find_element(By.ID, "tab-fleet").click()
    until(browser, seen.visibility_of_element_located(node))
    letter = (By.XPATH, f'//table[@id="dead-letters"]//tr[td[text()="{reason}"]]')
    until(browser, seen.visibility_of_element_located(letter))
    assert int(browser.find_element(By.ID, "dead-count").text) >= 1
    job_id = why.split()[1]  # "job <id> failed: ..."
    failure = (By.XPATH, f'//table[@id="failures"]//tr[td/span[@title="{job_id}"]]')
    row: WebElement = until(browser, seen.visibility_of_element_located(failure))  # type: ignore[assignment]
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    print(f"its row in the fleet view: {cells}")
    assert cells[1:5] == [f"{job_id[:8]}\N{HORIZONTAL ELLIPSIS}", "\N{EN DASH}", worker.name, "1"]
    assert cells[5] == why.split(": ", 1)[1]
    model = (By.XPATH, f'//table[@id="models"]//tr[td[text()="{MODEL}"]]')

    def model_row(_: object) -> list[str] | None:
        """The model's row once it shows this worker's node holding the model (the view
        refreshes; a node of an earlier test may still be listed beside it)."""
        cells = [c.text for c in browser.find_element(*model).find_elements(By.TAG_NAME, "td")]
        return cells if worker.name in cells[2] else None

    served: list[str] = until(browser, model_row)  # type: ignore[assignment]
    print(f"the model's row: {served}")
    assert served[0] == MODEL
    assert int(served[1]) >= 1
    assert served[3:] == ["0", "0"]  # nothing waits: the jobs this gateway queued were taken


NOTEBOOK_MODEL = "qwen2.5:0.5b"


@pytest.fixture
def notebook(settings: Settings) -> Iterator[Callable[[], WorkerRecord]]:
    """Puts a notebook node's record, draining with 25 minutes left before its session ends
    (only its record: no worker behind it); removed afterwards."""
    record = WorkerRecord(
        worker=unique("notebook") + "@colab",
        backend="openai",
        models=[NOTEBOOK_MODEL],
        loaded=[NOTEBOOK_MODEL],
        slots=4,
        running=1,
        cutoff=datetime.now(timezone.utc) + timedelta(minutes=25),
        draining=True,
        ttl_s=120,
    )
    with contextlib.closing(WorkerRegistry.from_settings(settings)) as registry:

        def put() -> WorkerRecord:
            registry.put(record)
            return record

        yield put  # pytest goes on below whether the test passed or not
        registry.remove(record.worker)


def test_a_node_that_comes_shows_in_the_fleet_view_draining_with_its_time_left_and_its_model(
    browser: Chrome,
    gateway: InProcessGateway,
    keys: KeyStore,
    notebook: Callable[[], WorkerRecord],
) -> None:
    _, admin = keys.create(unique("ui-admin"), admin=True)
    sign_in(browser, gateway.url, admin)
    options = browser.find_element(By.ID, "model")
    until(browser, lambda _: options.text)
    assert NOTEBOOK_MODEL not in options.text
    record = notebook()  # a node comes while the page is open

    browser.find_element(By.ID, "tab-fleet").click()
    node = (By.CSS_SELECTOR, f'#nodes tr[data-worker="{record.worker}"]')
    row: WebElement = until(browser, seen.visibility_of_element_located(node))  # type: ignore[assignment]
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    print(f"the notebook's row: {cells}")
    model = NOTEBOOK_MODEL
    assert cells[:6] == [record.worker, "openai", model, model, "1 of 4", "draining"]
    assert re.fullmatch(r"2[45] min \d+ s", cells[6]), cells[6]
    assert "draining" in str(row.get_attribute("class"))
    screenshot(browser, "ui-fleet")

    browser.find_element(By.ID, "tab-chat").click()  # the model list is read again
    until(browser, seen.text_to_be_present_in_element((By.ID, "model"), NOTEBOOK_MODEL))


def test_stop_cancels_the_answers_job(
    browser: Chrome, gateway: InProcessGateway, keys: KeyStore, producer: Producer
) -> None:
    _, secret = keys.create(unique("ui"))
    sign_in(browser, gateway.url, secret)
    box = ask(browser, MODEL, "Tell me a long story.")
    until(browser, lambda _: box.find_element(By.CLASS_NAME, "text").text)
    browser.find_element(By.ID, "stop").click()
    until(browser, ended(box))

    meta = box.find_element(By.CLASS_NAME, "meta")
    assert box.get_attribute("data-ended") == "stopped"
    assert meta.get_attribute("data-state") == "cancelled"
    row = producer.results.get(str(box.get_attribute("data-job-id")))
    assert row is not None
    assert row.status is JobStatus.CANCELLED
    assert browser.find_element(By.ID, "send").is_displayed()
