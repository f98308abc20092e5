"""The dashboard in a real headless Chromium, on a real server with a real worker.

Every wait is a bounded WebDriverWait on something a user would see (no sleeps). The pages
poll every 2 s, so "see the new state" waits at most a few polls.
"""
from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import requests

from sync_worker.client import Client
from tests.dashboard import dashboard_tasks as dt
from tests.dashboard.conftest import WAIT, screenshot

pytestmark = pytest.mark.timeout(180)


# -- helpers -------------------------------------------------------------------------------------
def wait(driver: Any, condition: Any, message: str, timeout: float = WAIT) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d: Any) -> Any:
        try:
            return condition(d)
        except StaleElementReferenceException:  # the page re-rendered under us: look again
            return False

    return WebDriverWait(driver, timeout).until(check, message)


def texts(driver: Any, css: str) -> list[str]:
    """The visible text of every element matching ``css``, read in one script call: the pages
    re-render every 2 s, and an element found by one WebDriver call may be gone by the next."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText.trim())", css)


def text(driver: Any, css: str) -> str:
    found = texts(driver, css)
    return found[0] if found else ""


def attribute(driver: Any, css: str, name: str) -> str | None:
    return driver.execute_script("const e = document.querySelector(arguments[0]); "
                                 "return e ? e.getAttribute(arguments[1]) : null", css, name)


def click(driver: Any, css: str) -> None:
    """Click ``css`` once it is there and enabled (found again if a re-render replaced it)."""
    from selenium.webdriver.common.by import By

    def clicked(d: Any) -> bool:
        element = d.find_element(By.CSS_SELECTOR, css)
        if not element.is_enabled():
            return False
        element.click()
        return True

    wait(driver, clicked, f"{css} to be clickable")


def assert_no_alert(driver: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        alert = driver.switch_to.alert
        message = alert.text
    except NoAlertPresentException:
        return
    raise AssertionError(f"a dialog opened: {message!r}")


def open_run(driver: Any, dashboard: str, run_id: str) -> None:
    driver.get(f"{dashboard}#/runs/{run_id}")
    wait(driver, lambda d: text(d, "#run-state"), f"the page of run {run_id}")


def run_state(run_id: str) -> str:
    return Client().read_task_run(run_id).state.type.value


# -- tests ---------------------------------------------------------------------------------------
def test_overview_shows_the_counts_of_a_real_workload(browser, dashboard, start_worker):
    worker = start_worker(dt.add, dt.boom, limit=3)
    for i in range(3):
        assert dt.add.delay(i, 1).result(timeout=60) == i + 1
    for i in range(2):
        dt.boom.delay(f"boom {i}").wait(timeout=60)
    dt.idle.delay("waits")
    browser.get(dashboard)

    def cell(task_key: str, state: str) -> str:
        return text(browser, f'tr[data-task-key="{task_key}"] td[data-state="{state}"]')

    wait(browser, lambda d: cell("dash.add", "COMPLETED") == "3", "3 COMPLETED runs of dash.add")
    assert cell("dash.boom", "FAILED") == "2"
    assert cell("dash.idle", "SCHEDULED") == "1"
    assert text(browser, 'tr[data-task-key="dash.idle"] td:last-child').startswith("waiting")
    assert "3 completed and 2 failed in the last 15 minutes" in text(browser, "#throughput-summary")
    worker_row = f'#worker-table tr[data-client-id="{worker.client_id}"]'
    wait(browser, lambda d: texts(d, worker_row), f"worker {worker.client_id} in the workers table")
    row = text(browser, worker_row)
    assert "dash.add" in row and "dash.boom" in row and "127.0.0.1" in row
    assert "Workers (1 connected)" in text(browser, "#workers-title")
    # live: a new run shows up without a reload
    assert dt.add.delay(10, 1).result(timeout=60) == 11
    wait(browser, lambda d: cell("dash.add", "COMPLETED") == "4", "the 4th run, without a reload")
    screenshot(browser, "overview.png")


def test_runs_filters_and_paging(browser, dashboard, start_worker):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    start_worker(dt.add, dt.boom, limit=3)
    assert dt.add.delay(1, 1).result(timeout=60) == 2
    failed = dt.boom.delay("filtered").wait(timeout=60)
    assert failed.type.value == "FAILED"
    waiting = [dt.idle.delay(i) for i in range(55)]
    browser.get(dashboard + "#/runs")
    wait(browser, lambda d: text(d, "#runs-total") == "57 runs match", "57 runs listed")
    assert len(texts(browser, "#runs-table tbody tr")) == 50  # one page, newest first
    assert attribute(browser, "#runs-table tbody tr", "data-run-id") == waiting[-1].task_run_id
    click(browser, "#page-older")
    wait(browser, lambda d: len(texts(d, "#runs-table tbody tr")) == 7, "the second page (7 runs)")
    click(browser, "#page-newer")
    wait(browser, lambda d: len(texts(d, "#runs-table tbody tr")) == 50, "back on the first page")
    # state filter
    Select(browser.find_element(By.ID, "filter-state")).select_by_value("FAILED")
    click(browser, "#filter-apply")
    wait(browser, lambda d: text(d, "#runs-total") == "1 run matches", "the FAILED run only")
    assert "state=FAILED" in browser.current_url  # a real link: works on reload
    browser.refresh()
    wait(browser, lambda d: text(d, "#runs-total") == "1 run matches", "the filter after a reload")
    assert "Failed" in text(browser, "#runs-table tbody tr")
    # task key filter (and no state)
    Select(browser.find_element(By.ID, "filter-state")).select_by_value("")
    key = browser.find_element(By.ID, "filter-task-key")
    key.clear()
    key.send_keys("dash.add")
    click(browser, "#filter-apply")
    wait(browser, lambda d: text(d, "#runs-total") == "1 run matches", "the dash.add run only")
    assert "dash.add" in text(browser, "#runs-table tbody tr")
    # time range: the last 15 minutes holds every run, a range that ended before them none
    browser.get(dashboard + "#/runs?range=15m")
    wait(browser, lambda d: text(d, "#runs-total") == "57 runs match", "57 runs in the last 15 minutes")
    browser.get(dashboard + "#/runs?until=2000-01-01T00:00:00Z")
    wait(browser, lambda d: text(d, "#runs-empty"), "no run created before 2000")


def test_a_failed_run_shows_its_traceback_and_states(browser, dashboard, start_worker, monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")  # parameters on the server: the page shows them
    start_worker(dt.boom, limit=1)
    future = dt.boom.delay("it went wrong here")
    assert future.wait(timeout=60).type.value == "FAILED"
    browser.get(dashboard + "#/runs?state=FAILED")
    click(browser, f'tr[data-run-id="{future.task_run_id}"] td.name a')
    wait(browser, lambda d: "ValueError" in text(d, "#traceback"), "the traceback")
    assert "it went wrong here" in text(browser, "#traceback")
    assert "Traceback (most recent call last)" in text(browser, "#traceback")
    assert text(browser, "#error-summary") == "ValueError: it went wrong here"
    assert json.loads(text(browser, "#parameters")) == {"message": "it went wrong here"}
    assert "Failed" in text(browser, "#run-state")
    states = texts(browser, "#states-table tbody tr")
    assert "Scheduled" in states[0] and "Failed" in states[-1] and len(states) >= 3
    assert browser.find_element("id", "retry-button").is_enabled()
    assert not browser.find_element("id", "cancel-button").is_enabled()
    screenshot(browser, "run.png", full_page=True)


def test_cancel_a_scheduled_run(browser, dashboard, start_worker):
    start_worker(dt.add, limit=1)
    future = dt.add.apply_async((1, 2), countdown=600)
    open_run(browser, dashboard, future.task_run_id)
    assert "Scheduled" in text(browser, "#run-state")
    click(browser, "#cancel-button")
    wait(browser, lambda d: text(d, "#action-outcome").startswith("Cancelled"), "the outcome of Cancel")
    wait(browser, lambda d: "CANCELLED" in text(d, "#run-state") or "Cancelled" in text(d, "#run-state"),
         "the run page showing CANCELLED")
    assert run_state(future.task_run_id) == "CANCELLED"
    assert not browser.find_element("id", "cancel-button").is_enabled()


def test_retry_a_failed_run_and_see_the_new_run_complete(browser, dashboard, start_worker, tmp_path):
    start_worker(dt.fails_once, limit=1)
    future = dt.fails_once.delay(str(tmp_path / "marker"))
    assert future.wait(timeout=60).type.value == "FAILED"
    open_run(browser, dashboard, future.task_run_id)
    click(browser, "#retry-button")
    wait(browser, lambda d: text(d, "#retried-run"), "the outcome of Retry")
    assert text(browser, "#action-outcome").startswith("Retried: new run")
    new_id = text(browser, "#retried-run")
    assert new_id != future.task_run_id
    click(browser, "#retried-run")
    wait(browser, lambda d: "Completed" in text(d, "#run-state"), "the new run COMPLETED")
    wait(browser, lambda d: "completed on the retry" in text(d, "#result"), "the new run's result")
    assert run_state(future.task_run_id) == "FAILED"  # the old run is left as it was
    assert run_state(new_id) == "COMPLETED"


def test_a_hostile_task_name_and_values_render_as_text(browser, dashboard, start_worker, monkeypatch):
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")  # parameters on the server: the page shows them
    start_worker(dt.xss, limit=1)
    hostile = "<script>alert(2)</script><b>bold</b>"
    future = dt.xss.delay(hostile)
    assert future.wait(timeout=60).type.value == "FAILED"
    browser.get(dashboard + "#/runs")
    link = f'tr[data-run-id="{future.task_run_id}"] td.name a'
    wait(browser, lambda d: texts(d, link), "the run in the table")
    assert text(browser, link) == dt.XSS_NAME
    assert_no_alert(browser)
    open_run(browser, dashboard, future.task_run_id)
    wait(browser, lambda d: hostile in text(d, "#traceback"), "the traceback with the hostile text")
    assert text(browser, "h1") == dt.XSS_NAME
    assert json.loads(text(browser, "#parameters")) == {"text": hostile}
    assert_no_alert(browser)
    main = browser.find_element(By.ID, "main")
    assert main.find_elements(By.TAG_NAME, "img") == []
    assert main.find_elements(By.TAG_NAME, "script") == []
    assert main.find_elements(By.TAG_NAME, "b") == []
    browser.get(dashboard)
    wait(browser, lambda d: texts(d, 'tr[data-task-key="dash.xss"]'), "the overview")
    assert_no_alert(browser)


def test_with_an_auth_string_the_dashboard_asks_for_it(server_factory, new_browser, monkeypatch, tmp_path):
    from selenium.webdriver.common.by import By

    server = server_factory(auth_string="s3cret")
    root = server.url[: -len("/api")]
    # no credentials: 401 with the browser's Basic prompt, and the API refuses too
    page = requests.get(root + "/", timeout=10)
    assert page.status_code == 401
    assert page.headers["WWW-Authenticate"].startswith("Basic ")
    assert "Content-Security-Policy" in page.headers
    assert requests.get(server.url + "/sync_worker/dashboard/overview", timeout=10).status_code == 401
    anonymous = new_browser()
    anonymous.get(root + "/")
    assert anonymous.find_elements(By.ID, "main") == []  # no dashboard without the auth string
    # the browser's Basic credentials (any user name, the auth string as password) on every call
    basic = {"Authorization": "Basic " + base64.b64encode(b"anyone:s3cret").decode()}
    assert requests.get(server.url + "/sync_worker/dashboard/overview", headers=basic, timeout=10).status_code == 200
    assert requests.get(root + "/", auth=("anyone", "wrong"), timeout=10).status_code == 401
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_API_AUTH_STRING", "s3cret")
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    run_id = dt.idle.delay("behind auth").task_run_id
    browser = new_browser()
    browser.get(root.replace("http://", "http://anyone:s3cret@") + "/")
    wait(browser, lambda d: text(d, 'tr[data-task-key="dash.idle"] td[data-state="SCHEDULED"]') == "1",
         "the overview behind auth")
    click(browser, 'tr[data-task-key="dash.idle"] td:last-child a')
    wait(browser, lambda d: "Scheduled" in text(d, "#run-state"), "the run page behind auth")
    click(browser, "#cancel-button")  # a POST carries the credentials too
    wait(browser, lambda d: text(d, "#action-outcome").startswith("Cancelled"), "Cancel behind auth")
    assert run_state(run_id) == "CANCELLED"


def test_an_unreachable_server_is_shown_as_such(browser, dashboard, server):
    browser.get(dashboard)
    wait(browser, lambda d: text(d, "#updated").startswith("Updated"), "a first update")
    assert not browser.find_element("id", "banner").is_displayed()
    server.stop()
    wait(browser, lambda d: "Cannot reach the sync-worker server" in text(d, "#banner"), "the banner")
    assert "Overview" in text(browser, "h1")  # what it showed stays


def test_readable_at_phone_width(new_browser, dashboard, start_worker):
    start_worker(dt.add, limit=1)
    future = dt.add.delay(2, 3)
    assert future.result(timeout=60) == 5
    phone = new_browser(390, 844)
    phone.get(dashboard + "#/runs")
    wait(phone, lambda d: texts(d, "#runs-table tbody tr"), "the runs table")
    overflow = phone.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    open_run(phone, dashboard, future.task_run_id)
    wait(phone, lambda d: "5" in text(d, "#result"), "the result")
    overflow = phone.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the run page is {overflow}px wider than a phone screen"
