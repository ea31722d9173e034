"""The gateway's web page (``/ui``) in a real browser: headless Chromium driven by Selenium,
against a real gateway, broker, Redis and a worker on a simulator that streams 20 tokens a
second, so an answer is seen arriving, and can be stopped, before it ends.

With ``AVOCADO_UI_SCREENSHOTS=<dir>`` each view is saved there as a PNG (the README's)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as seen
from selenium.webdriver.support.wait import WebDriverWait

from avocado_shared import JobStatus, Producer
from avocado_shared.keys import KeyStore
from avocado_sim import OllamaSimulator, SimConfig
from tests.gateway import InProcessGateway
from tests.infer_http import MODEL, Gateways, unique
from tests.inprocess import InProcessWorker

WAIT = 60
TOKENS = 60  # at 20 tokens a second: 3 s an answer
ASK = "Tell me about avocados."


@pytest.fixture(scope="module")
def sim() -> Iterator[OllamaSimulator]:
    """The module's simulator (the ``worker`` fixture's), slow enough to watch."""
    with OllamaSimulator(SimConfig(models=[MODEL], default_tokens=TOKENS, tokens_per_s=20)) as s:
        yield s


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Debian's headless Chromium, driven through its chromedriver."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def gateway(gateway_factory: Gateways, worker: InProcessWorker) -> InProcessGateway:
    """A gateway that asks for API keys, before the module's worker."""
    return gateway_factory(require_keys=True)


def _shot(browser: WebDriver, name: str) -> None:
    """Save the view as ``<name>.png`` when AVOCADO_UI_SCREENSHOTS names a directory."""
    folder = os.environ.get("AVOCADO_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


def _until(browser: WebDriver, condition: Callable[[WebDriver], object]) -> object:
    return WebDriverWait(browser, WAIT).until(condition)


def _sign_in(browser: WebDriver, url: str, secret: str) -> None:
    browser.get(f"{url}/ui")
    browser.find_element(By.ID, "key").send_keys(secret)
    browser.find_element(By.ID, "sign-in").click()
    _until(browser, seen.visibility_of_element_located((By.ID, "view-chat")))


def _ask(browser: WebDriver, prompt: str) -> WebElement:
    """Send ``prompt``; the answer's box."""
    _until(browser, seen.text_to_be_present_in_element((By.ID, "model"), MODEL))
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "send").click()
    return _until(browser, seen.presence_of_element_located((By.CSS_SELECTOR, ".assistant")))  # type: ignore[return-value]


def _ended(box: WebElement) -> Callable[[WebDriver], bool]:
    """The answer's stream is over and the page read its job's final state."""
    meta = box.find_element(By.CLASS_NAME, "meta")
    return lambda _: (
        bool(box.get_attribute("data-ended"))
        and meta.get_attribute("data-state") in ("success", "failure", "cancelled")
    )


def test_a_key_signs_in_and_an_answer_streams_in_with_its_node_attempts_and_speed(
    browser: WebDriver,
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
    refusal = _until(browser, seen.text_to_be_present_in_element((By.ID, "sign-in-error"), "key"))
    assert refusal
    _shot(browser, "ui-sign-in")
    assert browser.execute_script("return sessionStorage.length") == 0

    browser.find_element(By.ID, "key").clear()
    _sign_in(browser, gateway.url, secret)
    assert secret not in browser.current_url
    assert browser.execute_script("return Object.values(sessionStorage)") == [secret]

    box = _ask(browser, ASK)
    text = box.find_element(By.CLASS_NAME, "text")
    # Streamed: text is on the page while the answer is still being written.
    _until(browser, lambda _: text.text and "streaming" in str(box.get_attribute("class")))
    partial = text.text
    _until(browser, _ended(box))
    _shot(browser, "ui-chat")

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
    browser: WebDriver, gateway: InProcessGateway, keys: KeyStore, worker: InProcessWorker
) -> None:
    _, plain = keys.create(unique("ui"))
    _, admin = keys.create(unique("ui-admin"), admin=True)
    node = (By.CSS_SELECTOR, f'#nodes tr[data-worker="{worker.name}"]')

    _sign_in(browser, gateway.url, plain)
    browser.find_element(By.ID, "tab-fleet").click()
    row = _until(browser, seen.visibility_of_element_located(node))
    assert MODEL in row.text  # type: ignore[attr-defined]
    assert browser.find_element(By.ID, "admin-note").is_displayed()
    assert not browser.find_element(By.ID, "failures").is_displayed()

    browser.find_element(By.ID, "sign-out").click()
    _until(browser, seen.visibility_of_element_located((By.ID, "view-sign-in")))
    assert browser.execute_script("return sessionStorage.length") == 0
    _sign_in(browser, gateway.url, admin)
    browser.find_element(By.ID, "tab-fleet").click()
    _until(browser, seen.visibility_of_element_located(node))
    _until(browser, seen.visibility_of_element_located((By.ID, "dead-letters")))
    models = browser.find_element(By.ID, "models").text
    assert MODEL in models
    print(f"fleet view, nodes:\n{browser.find_element(By.ID, 'nodes').text}")
    _shot(browser, "ui-fleet")


def test_stop_cancels_the_answers_job(
    browser: WebDriver, gateway: InProcessGateway, keys: KeyStore, producer: Producer
) -> None:
    _, secret = keys.create(unique("ui"))
    _sign_in(browser, gateway.url, secret)
    box = _ask(browser, "Tell me a long story.")
    _until(browser, lambda _: box.find_element(By.CLASS_NAME, "text").text)
    browser.find_element(By.ID, "stop").click()
    _until(browser, _ended(box))

    meta = box.find_element(By.CLASS_NAME, "meta")
    assert box.get_attribute("data-ended") == "stopped"
    assert meta.get_attribute("data-state") == "cancelled"
    row = producer.results.get(str(box.get_attribute("data-job-id")))
    assert row is not None
    assert row.status is JobStatus.CANCELLED
    assert browser.find_element(By.ID, "send").is_displayed()
