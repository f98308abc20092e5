"""The dashboard's server side without a browser: its files and headers, its JSON endpoints
(validation, paging, the time range, throughput), retry, --no-ui and the Basic credentials."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from sync_worker.server.dashboard import CONTENT_SECURITY_POLICY, basic_matches
from tests.dashboard import dashboard_tasks as dt
from tests.helpers import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def _root(server) -> str:
    return server.url[: -len("/api")]


def _create(server, task_key: str = "dash.api", name: str = "n", **state_details) -> dict:
    body = {"name": name, "task_key": task_key, "dynamic_key": str(uuid.uuid4()),
            "state": {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"deferred": True, **state_details}}}
    response = requests.post(server.url + "/task_runs/", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def _runs(server, query: str = "") -> dict:
    response = requests.get(server.url + "/sync_worker/dashboard/runs" + query, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_page_and_its_files_are_served_with_a_content_security_policy(server):
    page = requests.get(_root(server) + "/", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert '<script src="ui/app.js"' in page.text
    script = requests.get(_root(server) + "/ui/app.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML(", "document.write(", "eval("):
        assert sink not in script.text, sink  # nothing is parsed as HTML or code
    assert requests.get(_root(server) + "/ui/app.css", timeout=10).headers["Content-Type"].startswith("text/css")
    missing = requests.get(_root(server) + "/ui/nothing.js", timeout=10)
    assert missing.status_code == 404 and "nothing.js" in missing.json()["detail"]


def test_no_ui_turns_the_dashboard_off(server_factory):
    server = server_factory(ui=False)
    for path in ("/", "/ui/app.js", "/api/sync_worker/dashboard/overview", "/api/sync_worker/dashboard/runs"):
        response = requests.get(_root(server) + path, timeout=10)
        assert response.status_code == 404, path
        assert "--no-ui" in response.json()["detail"]
    retry = requests.post(server.url + f"/sync_worker/task_runs/{uuid.uuid4()}/retry", json={}, timeout=10)
    assert retry.status_code == 404 and "--no-ui" in retry.json()["detail"]  # the Retry button's endpoint
    cancel = requests.post(server.url + f"/sync_worker/task_runs/{uuid.uuid4()}/cancel", json={}, timeout=10)
    assert cancel.status_code == 404 and "--no-ui" not in cancel.text  # `runs cancel` uses it: an unknown run
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_the_cli_passes_no_ui(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sync_worker", "server", "--port", str(port), "--db",
                             str(tmp_path / "s.db"), "--no-ui"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def answered():
            try:  # a list: a 404 Response is falsy
                return [requests.get(f"http://127.0.0.1:{port}/", timeout=2)]
            except requests.ConnectionError:
                return None
        (response,) = wait_for(answered, timeout=30, message="the server to answer")
        assert response.status_code == 404 and "--no-ui" in response.json()["detail"]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("sort_at_most", [5000, 1], ids=["index-and-sort", "walk-by-seq"])
def test_runs_are_listed_newest_first_and_paged_by_position(server, monkeypatch, sort_at_most):
    from sync_worker.server import dashboard

    monkeypatch.setattr(dashboard, "SORT_AT_MOST", sort_at_most)  # both ways of reading a filtered page
    made = [_create(server, task_key="dash.a" if i % 2 else "dash.b")["id"] for i in range(7)]
    page = _runs(server, "?limit=3")
    assert [r["id"] for r in page["runs"]] == made[::-1][:3]
    assert page["total"] == 7 and page["newer"] is None and page["older"] is not None
    second = _runs(server, f"?limit=3&before={page['older']}")
    assert [r["id"] for r in second["runs"]] == made[::-1][3:6]
    assert second["newer"] == second["runs"][0]["seq"]
    last = _runs(server, f"?limit=3&before={second['older']}")
    assert [r["id"] for r in last["runs"]] == [made[0]] and last["older"] is None
    back = _runs(server, f"?limit=3&after={second['newer']}")
    assert [r["id"] for r in back["runs"]] == made[::-1][:3] and back["newer"] is None
    only_a = _runs(server, "?task_key=dash.a")
    assert [r["id"] for r in only_a["runs"]] == [made[5], made[3], made[1]] and only_a["total"] == 3
    assert _runs(server, "?state=COMPLETED") == {"runs": [], "total": 0, "limit": 50, "older": None, "newer": None}
    assert _runs(server, "?state=SCHEDULED&task_key=dash.b")["total"] == 4
    # filtered pages, both ways
    b_page = _runs(server, "?task_key=dash.b&limit=2")
    assert [r["id"] for r in b_page["runs"]] == [made[6], made[4]] and b_page["total"] == 4
    b_older = _runs(server, f"?task_key=dash.b&limit=2&before={b_page['older']}")
    assert [r["id"] for r in b_older["runs"]] == [made[2], made[0]] and b_older["older"] is None
    b_newer = _runs(server, f"?task_key=dash.b&limit=2&after={b_older['newer']}")
    assert [r["id"] for r in b_newer["runs"]] == [made[6], made[4]] and b_newer["newer"] is None
    assert b_newer["older"] is not None


def test_the_time_range_is_on_creation_time(server):
    first = _create(server)
    second = _create(server)
    assert second["created"] > first["created"]
    since = _runs(server, "?since=" + second["created"])  # created at or after
    assert [r["id"] for r in since["runs"]] == [second["id"]] and since["total"] == 1
    until = _runs(server, "?until=" + second["created"])  # created before
    assert [r["id"] for r in until["runs"]] == [first["id"]] and until["total"] == 1
    later = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    assert _runs(server, "?since=" + requests.utils.quote(later))["runs"] == []


@pytest.mark.parametrize("query, field", [("?state=DONE", "state"), ("?limit=0", "limit"), ("?limit=201", "limit"),
                                          ("?before=x", "before"), ("?since=yesterday", "since"),
                                          ("?before=1&after=2", "after"),
                                          # numbers past SQLite's integers: 422, not a 500
                                          ("?before=9223372036854775808", "before"),
                                          ("?after=9223372036854775807", "after"),
                                          ("?limit=%EF%BC%95", "limit")])  # a fullwidth digit
def test_bad_listing_queries_are_refused_with_the_field(server, query, field):
    response = requests.get(server.url + "/sync_worker/dashboard/runs" + query, timeout=10)
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json())


def test_one_run_unknown_and_malformed_ids(server):
    assert requests.get(server.url + f"/sync_worker/dashboard/runs/{uuid.uuid4()}", timeout=10).status_code == 404
    assert requests.get(server.url + "/sync_worker/dashboard/runs/nope", timeout=10).status_code == 422
    assert requests.post(server.url + f"/sync_worker/task_runs/{uuid.uuid4()}/retry", json={},
                         timeout=10).status_code == 404


def test_overview_counts_throughput_and_workers(server, api_env, start_worker):
    worker = start_worker(dt.add, dt.boom, limit=2)
    assert dt.add.delay(1, 2).result(timeout=60) == 3
    dt.boom.delay("x").wait(timeout=60)
    waiting = dt.idle.delay(1)
    data = requests.get(server.url + "/sync_worker/dashboard/overview", timeout=10).json()
    keys = {k["task_key"]: k for k in data["task_keys"]}
    assert keys["dash.add"]["counts"] == {"COMPLETED": 1} and keys["dash.boom"]["counts"] == {"FAILED": 1}
    assert keys["dash.idle"]["oldest_scheduled_id"] == waiting.task_run_id
    assert keys["dash.idle"]["oldest_scheduled_age_seconds"] >= 0
    t = data["throughput"]
    assert len(t["completed"]) == len(t["failed"]) == 90 and t["bucket_seconds"] == 10
    assert sum(t["completed"]) == 1 and sum(t["failed"]) == 1
    (info,) = data["workers"]
    assert info["client_id"] == worker.client_id and info["limit"] == 2 and info["in_flight"] == 0
    assert info["connected_since"].endswith("Z") and set(info["task_keys"]) == {"dash.add", "dash.boom"}


def test_retry_copies_parameters_kept_on_the_server(server, api_env, start_worker, monkeypatch, tmp_path):
    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")
    start_worker(dt.fails_once, limit=1)
    failed = dt.fails_once.delay(str(tmp_path / "marker"))
    assert failed.wait(timeout=60).type.value == "FAILED"
    details = requests.get(server.url + f"/sync_worker/dashboard/runs/{failed.task_run_id}", timeout=10).json()
    assert details["parameters"]["value"] == {"marker": str(tmp_path / "marker")}
    assert details["parameters"]["note"] is None
    assert details["outcome"]["error_type"] == "RuntimeError"
    assert [s["type"] for s in details["states"]][0] == "SCHEDULED" and details["states"][-1]["type"] == "FAILED"
    assert details["states"][0]["duration_seconds"] >= 0 and details["states"][-1]["duration_seconds"] is None
    answer = requests.post(server.url + f"/sync_worker/task_runs/{failed.task_run_id}/retry", json={}, timeout=10)
    assert answer.status_code == 201, answer.text
    assert answer.json()["parameters"] == "copied"
    new_id = answer.json()["task_run"]["id"]
    wait_for(lambda: requests.get(server.url + f"/task_runs/{new_id}", timeout=10).json()["state"]["type"]
             == "COMPLETED", timeout=60, message="the retried run to complete")
    # a run still waiting cannot be retried (409 naming why)
    waiting = dt.idle.delay(1)
    refused = requests.post(server.url + f"/sync_worker/task_runs/{waiting.task_run_id}/retry", json={}, timeout=10)
    assert refused.status_code == 409 and "only a finished run" in refused.json()["detail"]


def test_browser_basic_credentials_map_to_the_auth_string():
    def header(text: str) -> str:
        return "Basic " + base64.b64encode(text.encode()).decode()

    # no ':' in the auth string: any user name, the auth string as the password
    assert basic_matches("s3cret", header("anyone:s3cret"))
    assert basic_matches("s3cret", header(":s3cret"))
    assert not basic_matches("s3cret", header("anyone:wrong"))
    assert not basic_matches("s3cret", header("s3cret"))  # checked by Core as it always was
    assert not basic_matches("s3cret", "Bearer s3cret")
    assert not basic_matches("s3cret", "Basic ***")
    assert not basic_matches(None, header("a:b"))
    # 'user:password' auth strings are the browser's user name and password as they are (Core)
    assert not basic_matches("admin:pw", header("x:admin:pw"))


def test_user_password_auth_string_works_from_the_browser_prompt(server_factory):
    server = server_factory(auth_string="admin:pw")
    assert requests.get(_root(server) + "/", auth=("admin", "pw"), timeout=10).status_code == 200
    assert requests.get(_root(server) + "/", auth=("admin", "nope"), timeout=10).status_code == 401
    overview = requests.get(server.url + "/sync_worker/dashboard/overview", auth=("admin", "pw"), timeout=10)
    assert overview.status_code == 200
    # a cross-origin page cannot press the buttons: the server's Origin rule holds
    refused = requests.post(server.url + f"/sync_worker/task_runs/{uuid.uuid4()}/retry", json={},
                            auth=("admin", "pw"), headers={"Origin": "http://evil.example"}, timeout=10)
    assert refused.status_code == 403


def test_non_ascii_results_and_parameters_are_shown_as_characters(server, api_env, start_worker, monkeypatch):
    """The result as the characters it holds, not JSON's \\u escapes, and the parameters' size
    limit counted in characters (800 "Ж" are 800 characters, not the 4,800 of their escapes)."""
    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")
    start_worker(dt.add, dt.boom, limit=2)
    added = dt.add.delay("héllo ", "wörld 👍 任务")
    failed = dt.boom.delay("Ж" * 800)
    assert added.result(timeout=60) == "héllo wörld 👍 任务"
    assert failed.wait(timeout=60).type.value == "FAILED"
    shown = requests.get(server.url + f"/sync_worker/dashboard/runs/{added.task_run_id}", timeout=10).json()
    assert shown["outcome"]["result"] == '"héllo wörld 👍 任务"'
    shown = requests.get(server.url + f"/sync_worker/dashboard/runs/{failed.task_run_id}", timeout=10).json()
    assert shown["parameters"]["value"] == {"message": "Ж" * 800} and shown["parameters"]["note"] is None
    assert shown["parameters"]["text"] == json.dumps({"message": "Ж" * 800}, indent=2, ensure_ascii=False)


def test_deeply_nested_results_and_parameters_get_a_note_not_a_500(server):
    """A 5,000-deep JSON string (accepted by REST) must not raise RecursionError in the run endpoint."""
    deep = "[" * 5000 + "]" * 5000
    run = _create(server, name="deep")
    state = {"type": "COMPLETED", "data": {"metadata": {"serializer": {"type": "json"}}, "result": deep}}
    response = requests.post(f"{server.url}/task_runs/{run['id']}/set_state", json={"state": state, "force": True},
                             timeout=10)
    assert response.status_code in (200, 201), response.text
    shown = requests.get(f"{server.url}/sync_worker/dashboard/runs/{run['id']}", timeout=10)
    assert shown.status_code == 200, shown.text
    assert "too deeply" in json.dumps(shown.json())

    params_id = str(uuid.uuid4())
    record = {"metadata": {"serializer": {"type": "json"}, "storage_key": params_id}, "result": deep}
    put = requests.put(f"{server.url}/storage/parameters.{params_id}", data=json.dumps(record),
                       headers={"Content-Type": "application/json"}, timeout=10)
    assert put.status_code < 300, put.text
    run2 = _create(server, name="deep-params", task_parameters_id=params_id)
    shown = requests.get(f"{server.url}/sync_worker/dashboard/runs/{run2['id']}", timeout=10)
    assert shown.status_code == 200, shown.text
    assert "too deeply" in json.dumps(shown.json())


def test_retry_and_cancel_refuse_malformed_json_bodies_and_change_nothing(server):
    run = _create(server, name="garbled")
    headers = {"Content-Type": "application/json"}
    before = requests.post(server.url + "/task_runs/count", json={}, timeout=10).json()
    for action, body in (("retry", "[1,2"), ("cancel", "{{{")):
        response = requests.post(f"{server.url}/sync_worker/task_runs/{run['id']}/{action}", data=body,
                                 headers=headers, timeout=10)
        assert response.status_code == 422, (action, response.status_code, response.text)
        assert "JSON" in response.json()["detail"]
    assert requests.post(server.url + "/task_runs/count", json={}, timeout=10).json() == before
    shown = requests.get(f"{server.url}/sync_worker/dashboard/runs/{run['id']}", timeout=10).json()
    assert "SCHEDULED" in json.dumps(shown)


def test_big_integers_come_as_exact_text(server, api_env, start_worker, monkeypatch):
    """JSON.parse in the page would round 2**64 + 1 to a double: the server also sends the
    parameters as the text the page shows (the result always was)."""
    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")
    start_worker(dt.add, dt.boom, limit=2)
    big = 2**64 + 1
    added = dt.add.delay(2**64, 1)
    failed = dt.boom.delay(big)
    assert added.result(timeout=60) == big
    assert failed.wait(timeout=60).type.value == "FAILED"
    shown = requests.get(server.url + f"/sync_worker/dashboard/runs/{failed.task_run_id}", timeout=10).json()
    assert shown["parameters"]["value"] == {"message": big}  # as it was, for API clients
    assert shown["parameters"]["text"] == '{\n  "message": 18446744073709551617\n}'
    shown = requests.get(server.url + f"/sync_worker/dashboard/runs/{added.task_run_id}", timeout=10).json()
    assert shown["outcome"]["result"] == "18446744073709551617"
    waiting = _create(server, name="no parameters")
    shown = requests.get(server.url + f"/sync_worker/dashboard/runs/{waiting['id']}", timeout=10).json()
    assert shown["parameters"] == {"value": {}, "note": None, "text": "{}"}


def _force(server, run_id: str, state_type: str, name: str) -> None:
    state = {"type": state_type, "name": name, "state_details": {"deferred": True}}
    response = requests.post(f"{server.url}/task_runs/{run_id}/set_state", json={"state": state, "force": True},
                             timeout=10)
    assert response.status_code in (200, 201), response.text


def test_run_time_is_the_time_spent_running(server):
    """Run time: the RUNNING (and CANCELLING) states summed over the attempts, not the wait
    for a retry between them; ``since``: the start of the current RUNNING or CANCELLING state."""
    import time

    retried = _create(server, name="retried")["id"]
    _force(server, retried, "RUNNING", "Running")
    time.sleep(0.2)
    _force(server, retried, "SCHEDULED", "AwaitingRetry")
    time.sleep(1.5)
    _force(server, retried, "RUNNING", "Retrying")
    time.sleep(0.2)
    _force(server, retried, "FAILED", "Failed")
    shown = requests.get(server.url + f"/sync_worker/dashboard/runs/{retried}", timeout=10).json()
    running = sum(s["duration_seconds"] for s in shown["states"] if s["type"] == "RUNNING")
    assert shown["run_time"] == {"seconds": pytest.approx(running, abs=1e-5), "since": None}
    assert shown["run_time"]["seconds"] < 1.5 <= shown["task_run"]["total_run_time"]  # that one counts the wait
    (listed,) = [r for r in _runs(server)["runs"] if r["id"] == retried]
    assert listed["run_time"] == shown["run_time"]

    cancelling = _create(server, name="cancelling")["id"]
    _force(server, cancelling, "RUNNING", "Running")
    time.sleep(0.2)
    _force(server, cancelling, "CANCELLING", "Cancelling")
    shown = requests.get(server.url + f"/sync_worker/dashboard/runs/{cancelling}", timeout=10).json()
    running = sum(s["duration_seconds"] for s in shown["states"] if s["type"] == "RUNNING")
    assert running >= 0.2
    assert shown["run_time"] == {"seconds": pytest.approx(running, abs=1e-5),
                                 "since": shown["states"][-1]["timestamp"]}  # still running: the page adds to it
    (listed,) = [r for r in _runs(server)["runs"] if r["id"] == cancelling]
    assert listed["run_time"] == shown["run_time"]

    waiting = _create(server, name="waiting")["id"]
    shown = requests.get(server.url + f"/sync_worker/dashboard/runs/{waiting}", timeout=10).json()
    assert shown["run_time"] is None  # never started
    assert [r["run_time"] for r in _runs(server)["runs"] if r["id"] == waiting] == [None]
