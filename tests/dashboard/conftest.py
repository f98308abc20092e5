"""Fixtures of the dashboard tests: a real headless Chromium driven by Selenium through the
system's chromedriver (Debian's ``chromium`` and ``chromium-driver``; nothing is downloaded).

Without a browser these tests skip with the reason, except when ``SYNC_WORKER_REQUIRE_BROWSER=1``
(set by ``.ci/run`` once it has installed Chromium): then a missing browser is a failure.
Screenshots are written to ``docs/screenshots/`` (named in the README, section Dashboard).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import api_env, start_worker  # noqa: F401 - fixtures used by the tests

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
#: a bound for every wait on the page (the machine is shared: generous)
WAIT = 20.0


def _find(names: list[str], env: str) -> str | None:
    if os.environ.get(env):
        path = os.environ[env]
        return path if os.access(path, os.X_OK) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("SYNC_WORKER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SYNC_WORKER_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def make_driver(width: int = 1280, height: int = 800) -> Any:
    """A new headless Chromium (its own profile: no credentials shared with another driver)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install selenium)")
    browser = _find(["chromium", "chromium-browser", "google-chrome"], "SYNC_WORKER_CHROMIUM")
    driver_path = _find(["chromedriver"], "SYNC_WORKER_CHROMEDRIVER")
    if browser is None or driver_path is None:
        _unavailable("Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(arg)
    # an alert() stays open (and is seen by the test) instead of being dismissed
    options.set_capability("unhandledPromptBehavior", "ignore")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    return driver


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = make_driver()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def new_browser() -> Iterator[Callable[..., Any]]:
    """``new_browser(width, height)``: more browsers, each quit at teardown."""
    drivers: list[Any] = []

    def make(width: int = 1280, height: int = 800) -> Any:
        driver = make_driver(width, height)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()


@pytest.fixture
def dashboard(server: Any, api_env: dict[str, str]) -> str:  # noqa: F811 - the fixture above
    """The dashboard's URL on the test's real server (this process's tasks submit there)."""
    return server.url[: -len("/api")] + "/"


def screenshot(driver: Any, name: str, full_page: bool = False) -> Path:
    """Save ``docs/screenshots/<name>``; ``full_page``: the whole page's height (up to 2400 px)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    size = driver.get_window_size()
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], min(max(int(height) + 120, size["height"]), 2400))
    try:
        driver.save_screenshot(str(path))
    finally:
        if full_page:
            driver.set_window_size(size["width"], size["height"])
    return path
