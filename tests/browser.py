"""The web page's tests drive Debian's headless Chromium through Selenium: starting it, and
what a person does on the page (sign in, ask, wait for an answer to end), each a wait on a
condition, never a sleep. With ``AVOCADO_UI_SCREENSHOTS=<dir>`` a test saves the views it
names there as PNGs (the README's)."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver import Chrome
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as seen
from selenium.webdriver.support.wait import WebDriverWait

__all__ = ["ask", "chromium", "ended", "screenshot", "sign_in", "until"]

WAIT = 60
_SIZE = (1280, 800)
_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    f"--window-size={_SIZE[0]},{_SIZE[1]}",
)


@contextmanager
def chromium() -> Iterator[Chrome]:
    """Debian's Chromium (``scripts/lib.sh`` ``ensure_chromium``), headless, quit on exit."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in _FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


def until(browser: WebDriver, condition: Callable[[WebDriver], object]) -> object:
    """What ``condition`` returns once it is truthy (checked every tenth of a second)."""
    return WebDriverWait(browser, WAIT, poll_frequency=0.1).until(condition)


def screenshot(browser: Chrome, name: str) -> None:
    """Save the view as ``<name>.png`` when AVOCADO_UI_SCREENSHOTS names a directory."""
    folder = os.environ.get("AVOCADO_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        # The whole page, however long, not only what the window shows (DevTools' capture).
        width, height = browser.execute_script(
            "const page = document.documentElement; return [page.scrollWidth, page.scrollHeight]"
        )
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        shot = browser.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
        )
        (Path(folder) / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


def sign_in(browser: WebDriver, url: str, secret: str) -> None:
    """Open the page of the gateway at ``url`` and sign in with ``secret``."""
    browser.get(f"{url}/ui")
    browser.find_element(By.ID, "key").send_keys(secret)
    browser.find_element(By.ID, "sign-in").click()
    until(browser, seen.visibility_of_element_located((By.ID, "view-chat")))


def ask(browser: WebDriver, model: str, prompt: str) -> WebElement:
    """Send ``prompt`` to ``model``; the answer's box (the newest)."""
    until(browser, seen.text_to_be_present_in_element((By.ID, "model"), model))
    boxes = (By.CSS_SELECTOR, ".assistant")
    before = len(browser.find_elements(*boxes))
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "send").click()
    until(browser, lambda b: len(b.find_elements(*boxes)) > before)
    return browser.find_elements(*boxes)[-1]


def ended(box: WebElement) -> Callable[[WebDriver], bool]:
    """The answer's stream is over and the page has read its job's final state."""
    meta = box.find_element(By.CLASS_NAME, "meta")
    final = ("success", "failure", "cancelled")
    return lambda _: (
        bool(box.get_attribute("data-ended")) and (meta.get_attribute("data-state") in final)
    )
