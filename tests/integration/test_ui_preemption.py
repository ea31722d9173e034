"""The web page while the worker writing its answer is SIGKILLed (a notebook's machine gone):
the answer on the page pauses, then goes on where it stopped, the text unbroken and equal to
the uninterrupted answer, and its line names the node that finished it and two attempts."""

from __future__ import annotations

from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By

from avocado_shared import JobStatus, Producer
from avocado_shared.keys import KeyStore
from avocado_sim import OllamaSimulator
from ollama_worker.ollama import OllamaClient
from tests.browser import ask, ended, screenshot, sign_in, until
from tests.conftest import WorkerFactory
from tests.infer_http import Gateways, unique
from tests.midanswer import ASK, MODEL

LEASE_S = "3"  # the dead worker's lease delays its job's redelivery by at most this


def test_an_answer_on_the_page_outlives_its_worker(
    browser: Chrome,
    gateway_factory: Gateways,
    keys: KeyStore,
    worker_factory: WorkerFactory,
    midanswer_sim: OllamaSimulator,
    uninterrupted: OllamaClient,
    producer: Producer,
) -> None:
    env = {"AVOCADO_JOB_LEASE_S": LEASE_S}
    doomed = worker_factory.process(midanswer_sim.url, concurrency=1, **env)
    gateway = gateway_factory(require_keys=True)
    _, secret = keys.create(unique("ui"))
    sign_in(browser, gateway.url, secret)

    box = ask(browser, MODEL, ASK)
    text = box.find_element(By.CLASS_NAME, "text")
    meta = box.find_element(By.CLASS_NAME, "meta")
    words = 5  # on the page before the kill
    until(
        browser,
        lambda _: (
            len(text.text.split()) >= words and meta.get_attribute("data-worker") == doomed.name
        ),
    )
    before = text.text
    doomed.kill()
    survivor = worker_factory(midanswer_sim.url, concurrency=1, **env)
    until(browser, ended(box))
    screenshot(browser, "ui-chat-preempted")

    print(f"text when the worker was killed: {before!r}")
    print(f"the answer's line after: {meta.text!r}")
    assert text.text == uninterrupted.chat(MODEL, [{"role": "user", "content": ASK}]).text
    assert text.text.startswith(before)
    row = producer.results.get(str(box.get_attribute("data-job-id")))
    assert row is not None
    assert row.status is JobStatus.SUCCESS
    assert row.attempts == 2
    assert meta.get_attribute("data-worker") == survivor.name == row.worker
    assert meta.get_attribute("data-attempts") == "2"
    assert f"node {survivor.name} · 2 attempts" in meta.text
