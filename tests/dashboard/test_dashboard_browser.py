"""The dashboard in a real headless Chromium, on a real server with a real worker.

Every wait is a bounded WebDriverWait on something a user would see (no sleeps). The pages
poll every 2 s, so "see the new state" waits at most a few polls.
"""
from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import requests

from sync_worker.client import Client
from sync_worker.tasks import task
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


def phone(driver: Any, width: int = 390, height: int = 800) -> Any:
    """Emulate a phone's viewport: headless Chromium does not make a window narrower than
    ~485 px, so ``--window-size=390,...`` would not test 390 px."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
    return driver


def overflow(driver: Any, width: int = 390) -> int:
    """How many px the page is wider than ``width`` (the emulated screen's width). A page wider
    than a phone's screen is zoomed out (then innerWidth exceeds it too)."""
    assert driver.execute_script("return screen.width") == width
    return driver.execute_script("return document.documentElement.scrollWidth") - width


def test_readable_at_phone_width(new_browser, dashboard, start_worker):
    start_worker(dt.add, limit=1)
    future = dt.add.delay(2, 3)
    assert future.result(timeout=60) == 5
    browser = phone(new_browser())
    browser.get(dashboard + "#/runs")
    wait(browser, lambda d: texts(d, "#runs-table tbody tr"), "the runs table")
    assert overflow(browser) <= 0, f"the page is {overflow(browser)}px wider than a phone screen"
    open_run(browser, dashboard, future.task_run_id)
    wait(browser, lambda d: "5" in text(d, "#result"), "the result")
    assert overflow(browser) <= 0, f"the run page is {overflow(browser)}px wider than a phone screen"


#: a task key no line can hold (the overview's row header, the workers table)
LONG_KEY = "dash.a_task_key_" + "without_any_space_" * 8


@task(task_key=LONG_KEY)
def long_key(x):
    return x


def test_long_messages_and_task_keys_fit_a_phone(new_browser, dashboard, start_worker):
    start_worker(dt.boom, long_key, limit=2)
    url = "https://example.com/" + "a" * 230  # 250 characters, no space
    huge = "x" * 90_000  # the state message (with Prefect's prefix) stays within the server's 100,000
    runs = {name: dt.boom.delay(message) for name, message in (("url", url), ("huge", huge))}
    for future in runs.values():
        assert future.wait(timeout=60).type.value == "FAILED"
    assert long_key.delay(1).result(timeout=60) == 1
    dt.idle.delay("waits")
    browser = phone(new_browser())
    for name, future in runs.items():
        open_run(browser, dashboard, future.task_run_id)
        wait(browser, lambda d: "ValueError" in text(d, "#run-header"), f"the message of the {name} run")
        assert overflow(browser) <= 0, f"the run page ({name}) is {overflow(browser)}px wider than 390 px"
    # the very long message is in a box of bounded height, not a page 90,000 characters long
    assert browser.execute_script("return document.getElementById('run-message').clientHeight") < 400
    browser.get(dashboard)
    wait(browser, lambda d: texts(d, f'tr[data-task-key="{LONG_KEY}"]'), "the long task key in the overview")
    wait(browser, lambda d: texts(d, "#worker-table tbody tr"), "the worker in the workers table")
    assert overflow(browser) <= 0, f"the overview is {overflow(browser)}px wider than 390 px"
    # the long key wraps: the first count is on screen beside it (the table scrolls in its box)
    left = browser.execute_script(
        "return document.querySelector('#task-key-table thead th:nth-child(2)').getBoundingClientRect().left")
    assert left < 390 / 2, f"the task key column is {left:.0f} px wide: the counts are off-screen"


def polls_seen(driver: Any) -> int:
    """Counts the page's successful polls from now on (each rewrites "Updated ...")."""
    return driver.execute_script("return window.__polls || 0")


def count_polls(driver: Any) -> None:
    driver.execute_script("""
        window.__polls = 0;
        new MutationObserver(() => { window.__polls++; })
          .observe(document.getElementById('updated'), {childList: true, characterData: true, subtree: true});""")


def test_polling_keeps_selection_scroll_and_focus(browser, dashboard, start_worker):
    start_worker(dt.boom, limit=1)
    message = "\n".join(f"line {i} of a long message" for i in range(200))  # a traceback taller than its box
    future = dt.boom.delay(message)
    assert future.wait(timeout=60).type.value == "FAILED"
    open_run(browser, dashboard, future.task_run_id)
    wait(browser, lambda d: "line 199" in text(d, "#traceback"), "the traceback")
    selected = browser.execute_script("""
        const pre = document.getElementById('traceback');
        pre.scrollTop = 150;
        const node = pre.firstChild, range = document.createRange();
        range.setStart(node, 10);
        range.setEnd(node, 60);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        return selection.toString();""")
    assert len(selected) == 50
    count_polls(browser)
    wait(browser, lambda d: polls_seen(d) >= 3, "three more polls")
    state = browser.execute_script("""
        const pre = document.getElementById('traceback'), selection = window.getSelection();
        return {text: selection.toString(), inside: selection.rangeCount > 0 && pre.contains(selection.anchorNode),
                connected: pre.isConnected, scroll: pre.scrollTop};""")
    assert state == {"text": selected, "inside": True, "connected": True, "scroll": 150}
    # Runs page: a focused link keeps the focus, across polls and across a redraw with new data
    browser.get(dashboard + "#/runs")
    link = f'tr[data-run-id="{future.task_run_id}"] td.name a'
    wait(browser, lambda d: texts(d, link), "the run in the table")
    browser.execute_script("document.querySelector(arguments[0]).focus()", link)
    focused = "return document.activeElement && document.activeElement.matches(arguments[0])"
    assert browser.execute_script(focused, link)
    count_polls(browser)
    wait(browser, lambda d: polls_seen(d) >= 3, "three more polls")
    assert browser.execute_script(focused, link), "the poll took the focus away"
    dt.idle.delay("a new run: the table is drawn again")
    wait(browser, lambda d: text(d, "#runs-total") == "2 runs match", "the new run")
    assert browser.execute_script(focused, link), "the redraw took the focus away"


def test_apply_keeps_the_seconds_of_from_and_to(browser, dashboard):
    from urllib.parse import parse_qs, unquote, urlsplit

    from selenium.webdriver.common.by import By

    from sync_worker.schemas import format_datetime

    ids = [dt.idle.delay(i).task_run_id for i in range(5)]
    created = sorted(format_datetime(Client().read_task_run(i).created) for i in ids)
    since, until = created[0], created[-1]  # to the microsecond: not on a minute's boundary
    browser.get(f"{dashboard}#/runs?since={since}&until={until}")
    wait(browser, lambda d: text(d, "#runs-total").endswith("match"), "the runs in the range")
    before = text(browser, "#runs-total")
    assert before in ("4 runs match", "5 runs match")
    click(browser, "#filter-apply")  # nothing changed: the same address, the same runs

    def asked(name: str) -> str:
        return parse_qs(urlsplit(unquote(browser.current_url).replace("#", "")).query)[name][0]

    assert (asked("since"), asked("until")) == (since, until)
    wait(browser, lambda d: text(d, "#runs-total").endswith("match"), "the runs after Apply")
    assert text(browser, "#runs-total") == before
    assert browser.find_element(By.ID, "filter-since").get_attribute("value").count(":") == 2  # seconds shown
    # a field the user changes keeps its seconds
    field = browser.find_element(By.ID, "filter-until")
    assert field.get_attribute("step") == "1"
    browser.execute_script("arguments[0].value = '2000-01-02T03:04:05'", field)
    click(browser, "#filter-apply")
    wait(browser, lambda d: text(d, "#runs-empty"), "no run before 2000")
    assert asked("until") == browser.execute_script("return new Date('2000-01-02T03:04:05').toISOString()")


def test_a_range_moves_with_the_clock(browser, dashboard):
    browser.get(dashboard + "#/runs?range=15m")
    wait(browser, lambda d: texts(d, "#runs-total"), "the runs page")
    browser.execute_script("""
        window.__urls = [];
        const fetch = window.fetch;
        window.fetch = function (url, init) {
          window.__urls.push(String(url));
          return fetch.apply(this, arguments);
        };""")
    wait(browser, lambda d: len(d.execute_script("return window.__urls")) >= 2, "two polls")
    urls = browser.execute_script("return window.__urls")[:2]
    from urllib.parse import parse_qs, urlsplit
    since = [parse_qs(urlsplit(u).query)["since"][0] for u in urls]
    assert since[0] < since[1], f"every poll asks for the same window: {since}"


def test_a_malformed_address_says_not_found(browser, dashboard):
    browser.get(f"{dashboard}#/runs?state=BOGUS")
    wait(browser, lambda d: "422" in text(d, "#banner"), "the server's 422 in the banner")
    browser.execute_script("location.hash = '#/runs/%E0%A4%A'")
    wait(browser, lambda d: text(d, "#not-found") == "Not found", "the not-found message")
    assert "not valid" in text(browser, "#main")
    assert not browser.find_element("id", "banner").is_displayed(), "the previous page's error stays"
    errors = [e for e in browser.get_log("browser") if "URIError" in e.get("message", "")]
    assert errors == []


def test_retry_is_disabled_exactly_when_the_server_refuses(browser, dashboard, start_worker):
    from sync_worker.schemas import Completed, Running, Scheduled, task_run_create

    start_worker(dt.add, limit=1)
    done = dt.add.delay(1, 2)
    assert done.result(timeout=60) == 3
    open_run(browser, dashboard, done.task_run_id)
    wait(browser, lambda d: "deleted when the run completed" in text(d, "#parameters"), "the parameters note")
    wait(browser, lambda d: "Completed" in text(d, "#run-state"), "the run COMPLETED")
    assert not browser.find_element("id", "retry-button").is_enabled()
    assert "parameters were deleted" in attribute(browser, "#retry-button", "title")
    refused = requests.post(f"{dashboard}api/sync_worker/task_runs/{done.task_run_id}/retry", json={}, timeout=10)
    assert refused.status_code == 409  # the server refuses too
    # a COMPLETED run that had no parameters can be retried: the button is enabled
    client = Client()
    bare = client.create_task_run(task_run_create(name="no parameters", task_key="dash.idle", state=Scheduled()))
    client.set_task_run_state(bare.id, Running(), force=True)
    client.set_task_run_state(bare.id, Completed(), force=True)
    open_run(browser, dashboard, str(bare.id))
    wait(browser, lambda d: "Completed" in text(d, "#run-state"), "the run COMPLETED")
    click(browser, "#retry-button")
    wait(browser, lambda d: text(d, "#retried-run"), "the outcome of Retry")


def fact(driver: Any, name: str) -> str:
    return driver.execute_script("""
        const dt = Array.from(document.querySelectorAll('dl.facts dt')).find(e => e.textContent === arguments[0]);
        return dt ? dt.nextElementSibling.innerText.trim() : null;""", name)


def test_run_time_of_waiting_and_running_runs(browser, dashboard):
    from sync_worker.schemas import Running

    future = dt.idle.delay("waits")  # no worker: SCHEDULED
    open_run(browser, dashboard, future.task_run_id)
    assert fact(browser, "Run time") == "\u2013"
    Client().set_task_run_state(future.task_run_id, Running(), force=True)
    wait(browser, lambda d: "Running" in text(d, "#run-state"), "the run RUNNING")
    _wait_for_a_growing_run_time(browser, dashboard, future.task_run_id)


def _wait_for_a_growing_run_time(browser, dashboard, run_id: str) -> None:
    """On the run's page (open) and in the runs table: a run time of 2 s or more."""

    def elapsed(value: str | None) -> float:
        return float(value.split()[0]) if value and value.endswith(" s") else 0.0

    wait(browser, lambda d: elapsed(fact(d, "Run time")) >= 2, f"a run time growing on the page of {run_id}")
    browser.get(dashboard + "#/runs")
    cell = f'tr[data-run-id="{run_id}"] td:nth-child(6)'
    wait(browser, lambda d: elapsed(text(d, cell)) >= 2, f"the run time of {run_id} in the runs table")


def test_times_say_their_zone(browser, dashboard):
    import re

    future = dt.idle.delay("waits")
    browser.get(dashboard + "#/runs")
    wait(browser, lambda d: texts(d, "#runs-table tbody tr"), "the runs table")
    zone = r"UTC([+-]\d\d:\d\d)?"
    assert re.fullmatch(rf"Created \({zone}\)", text(browser, "#runs-table thead th"))
    title = attribute(browser, "#runs-table tbody time", "title")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? UTC", title), title
    open_run(browser, dashboard, future.task_run_id)
    assert re.fullmatch(zone, fact(browser, "Times in"))


@pytest.mark.parametrize("query", ["state=BOGUS&range=zz", "before=abc", "since=garbage"])
def test_a_bad_filter_in_the_address_says_so_instead_of_loading_forever(browser, dashboard, query):
    browser.get(dashboard + "#/runs?" + query)
    wait(browser, lambda d: "cannot be shown" in text(d, "#runs"), "the refused filter explained")
    assert not text(browser, "#runs").startswith("Loading")
    assert "422" in text(browser, "#banner")


def force_state(dashboard: str, run_id: str, state_type: str, name: str, **details: Any) -> None:
    """Set a run's state as a worker would (REST, ``force``: any transition)."""
    state = {"type": state_type, "name": name, "state_details": {"deferred": True, **details}}
    response = requests.post(f"{dashboard}api/task_runs/{run_id}/set_state", json={"state": state, "force": True},
                             timeout=10)
    assert response.status_code in (200, 201), response.text


def test_a_hung_server_is_shown_as_unreachable(browser, dashboard, monkeypatch):
    """A server that takes the connection but never answers (SIGSTOPped, deadlocked) is shown
    as one that cannot be reached, once a poll has waited its timeout; and no longer once an
    answer comes again."""
    import threading

    from sync_worker.server import dashboard as module

    answer, release = module.overview, threading.Event()

    def hung(*args: Any, **kwargs: Any) -> Any:
        release.wait(60)  # the connection stays open, no answer comes
        return answer(*args, **kwargs)

    browser.get(dashboard)
    wait(browser, lambda d: text(d, "#updated").startswith("Updated"), "a first update")
    browser.execute_script("window.syncWorkerFetchTimeoutMs = 1000")  # not the 10 s a user gets
    monkeypatch.setattr(module, "overview", hung)
    try:
        wait(browser, lambda d: "Cannot reach the sync-worker server" in text(d, "#banner"),
             "the banner within a bounded wait", timeout=8)
        assert "no answer within 1 s" in text(browser, "#banner")
        assert "Overview" in text(browser, "h1")  # what it showed stays
    finally:
        monkeypatch.setattr(module, "overview", answer)
        release.set()
    wait(browser, lambda d: not d.find_element("id", "banner").is_displayed(), "the banner gone with an answer")


def test_big_integers_are_shown_exactly(browser, dashboard, start_worker, monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")  # parameters on the server: the page shows them
    start_worker(dt.add, dt.boom, limit=2)
    big = 2**64 + 1  # 18446744073709551617: a double would make it ...616
    added = dt.add.delay(2**64, 1)
    failed = dt.boom.delay(big)
    assert added.result(timeout=60) == big
    assert failed.wait(timeout=60).type.value == "FAILED"
    open_run(browser, dashboard, failed.task_run_id)
    wait(browser, lambda d: text(d, "#parameters"), "the parameters")
    assert text(browser, "#parameters") == '{\n  "message": 18446744073709551617\n}'
    open_run(browser, dashboard, added.task_run_id)
    wait(browser, lambda d: text(d, "#result") == "18446744073709551617", "the exact result")


def test_run_time_leaves_out_the_wait_for_a_retry_and_counts_cancelling(browser, dashboard):
    from sync_worker.schemas import Failed, Running, Scheduled

    client = Client()
    retried = dt.idle.delay("retried").task_run_id
    client.set_task_run_state(retried, Running(), force=True)
    client.set_task_run_state(retried, Scheduled(), force=True)  # waiting for its retry: not run time
    browser.get(dashboard + "#/runs")
    cell = f'tr[data-run-id="{retried}"] td:nth-child(6)'
    wait(browser, lambda d: text(d, cell).endswith(" ms"), "the run time of the first attempt")
    time.sleep(2.5)  # the wait for the retry: 2.5 s that the old "end - first start" counted
    client.set_task_run_state(retried, Running(), force=True)
    client.set_task_run_state(retried, Failed("failed again"), force=True)
    wait(browser, lambda d: "Failed" in text(d, f'tr[data-run-id="{retried}"]'), "the run FAILED")
    assert text(browser, cell).endswith(" ms"), f"the wait for the retry is counted: {text(browser, cell)}"
    open_run(browser, dashboard, retried)
    assert fact(browser, "Run time").endswith(" ms"), fact(browser, "Run time")
    # a CANCELLING run is still running: its run time grows
    cancelling = dt.idle.delay("cancelling").task_run_id
    client.set_task_run_state(cancelling, Running(), force=True)
    force_state(dashboard, cancelling, "CANCELLING", "Cancelling")
    open_run(browser, dashboard, cancelling)
    _wait_for_a_growing_run_time(browser, dashboard, cancelling)


def test_unknown_addresses_say_not_found(browser, dashboard):
    missing = "00000000-0000-4000-8000-000000000000"
    for address, says in (("#/nope", "No page"), (f"#/runs/{missing}", f"No run with id {missing}"),
                          ("#/runs/nope", "No run with id nope")):
        browser.get(dashboard + address)
        wait(browser, lambda d: text(d, "#not-found") == "Not found", f"the not-found page of {address}")
        assert says in text(browser, "#main"), text(browser, "#main")
        assert attribute(browser, '#main a[href="#/"]', "href") == "#/"  # a way back to the overview
        assert "Loading" not in text(browser, "#main")
    click(browser, '#main a[href="#/"]')
    wait(browser, lambda d: text(d, "h1") == "Overview", "the overview")


def test_bidi_controls_are_shown_escaped(browser, dashboard, start_worker, monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")  # parameters on the server: the page shows them
    start_worker(dt.bidi, limit=1)
    future = dt.bidi.delay("fdp." + dt.BIDI + "txt")
    assert future.wait(timeout=60).type.value == "FAILED"
    shown = "return document.getElementById('main').innerText"

    def escaped(d: Any) -> bool:
        page = d.execute_script(shown)
        return dt.BIDI not in page and "dash.bidi\\u202egpj.exe" in page

    browser.get(dashboard)
    wait(browser, lambda d: texts(d, "#worker-table tbody tr") and escaped(d), "the overview's keys escaped")
    assert "dash.bidi\\u202egpj.exe" in text(browser, "#worker-table tbody tr")
    browser.get(dashboard + "#/runs")
    wait(browser, lambda d: texts(d, f'tr[data-run-id="{future.task_run_id}"]') and escaped(d), "the runs escaped")
    open_run(browser, dashboard, future.task_run_id)
    wait(browser, lambda d: "ValueError" in text(d, "#traceback"), "the traceback")
    page = browser.execute_script(shown)
    assert dt.BIDI not in page, "a raw right-to-left override on the run page"
    assert "bad \\u202efdp.\\u202etxt" in text(browser, "#error-summary")
    assert "fdp.\\u202etxt" in text(browser, "#parameters") and "\\u202e" in text(browser, "#traceback")
    assert "\\u202e" in text(browser, "#run-header")  # the name and the state's message
    # in a style of their own, and the tooltip names the character
    assert attribute(browser, "#error-summary .control", "title").startswith("U+202E")


def test_a_very_long_name_keeps_the_buttons_on_screen(browser, dashboard):
    from sync_worker.schemas import Scheduled, task_run_create

    client = Client()
    name, key = "n" * 500, "k" * 1900  # about the longest the server takes (its dynamic key holds it), no space
    run = client.create_task_run(task_run_create(name=name, task_key=key, state=Scheduled()))
    open_run(browser, dashboard, str(run.id))
    wait(browser, lambda d: d.find_element("id", "cancel-button").is_enabled(), "the Cancel button")
    inside = """
        const r = document.getElementById(arguments[0]).getBoundingClientRect();
        return r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth;"""
    for button in ("cancel-button", "retry-button"):
        assert browser.execute_script(inside, button), f"{button} is off screen"
    assert attribute(browser, "#run-header h1", "title") == name  # the whole name, when cut
    assert browser.execute_script("return document.documentElement.scrollWidth <= innerWidth")
    assert browser.execute_script(  # the task key does not push the states below the first screen
        "return document.getElementById('states-table').getBoundingClientRect().top < innerHeight")
    browser.get(dashboard + "#/runs")
    row = f'tr[data-run-id="{run.id}"]'
    wait(browser, lambda d: texts(d, row), "the run in the table")
    # the row's last column (its id) is on screen, and the row is not a screen tall
    rect = browser.execute_script("return document.querySelector(arguments[0]).getBoundingClientRect().toJSON()",
                                  row + " td:last-child")
    assert rect["right"] <= 1280 and rect["height"] < 200, rect
    assert attribute(browser, row + " td:nth-child(3) [title]", "title") == key


def test_apply_keeps_spaces_in_the_task_key(browser, dashboard):
    from selenium.webdriver.common.by import By

    from sync_worker.schemas import Scheduled, task_run_create

    key = "  spaced key "
    Client().create_task_run(task_run_create(name="spaced", task_key=key, state=Scheduled()))
    dt.idle.delay("another key")
    browser.get(dashboard + "#/runs")
    wait(browser, lambda d: text(d, "#runs-total") == "2 runs match", "both runs")
    field = browser.find_element(By.ID, "filter-task-key")
    field.send_keys(key)
    click(browser, "#filter-apply")
    wait(browser, lambda d: text(d, "#runs-total") == "1 run matches", "the run of the key with spaces")
    assert browser.find_element(By.ID, "filter-task-key").get_attribute("value") == key
