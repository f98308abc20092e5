"""``/api/events/out`` filters events as Prefect 3.8.8's server does (server/events/filters.py,
schemas/events.py ``matches``, utilities/text_search_parser.py, api/events.py).

Real servers on 127.0.0.1, real websocket-client subscribers. "Not delivered" is shown by a
later marker event that does match arriving without the other one: events posted before the
subscription come in its backfill, oldest first, so the marker is given the latest
``occurred``; live events are posted once the server has the subscription.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.server.test_server_events import EventSocket, _iso

RESOURCE = "qa.parity.resource"


def event(name: str, occurred: datetime | None = None, labels: dict[str, str] | None = None,
          payload: dict[str, Any] | None = None, event_id: str | None = None) -> dict[str, Any]:
    return {"id": event_id or str(uuid.uuid4()), "occurred": _iso(occurred or datetime.now(timezone.utc)),
            "event": name, "resource": {"prefect.resource.id": RESOURCE, **(labels or {})},
            "related": [], "payload": payload or {}}


def window() -> dict[str, str]:
    now = datetime.now(timezone.utc)
    return {"since": _iso(now - timedelta(minutes=5)), "until": _iso(now + timedelta(hours=1))}


def post(wire: Any, server: Any, events: list[dict[str, Any]]) -> None:
    """POST /api/events: recorded (and published) when it returns."""
    response = wire.http.post(server.url + "/events", json=events, timeout=10)
    assert response.status_code == 204, response.text


def subscribe(sockets: Any, server: Any, event_filter: Any, **message: Any) -> EventSocket:
    out = sockets(server, "/events/out").authenticated()
    out.send({"type": "filter", "filter": event_filter, **message})
    return out


def subscribed(server: Any, count: int = 1) -> None:
    """Wait until the server has ``count`` live subscriptions: an event posted after that is
    live (the backfill and the registration are taken together)."""
    wait_for(lambda: server.events.stats()["subscribers"] == count, timeout=10, message="the subscription")


def names_until(out: EventSocket, marker: dict[str, Any], limit: int = 20) -> list[str]:
    """Names of the events received before ``marker`` (which must arrive)."""
    names = []
    for _ in range(limit):
        got = out.events(1, timeout=10)[0]
        if got["id"] == marker["id"]:
            return names
        names.append(got["event"])
    raise AssertionError(f"marker not received; got {names}")


def backfilled(server: Any, wire: Any, sockets: Any, event_filter: dict[str, Any],
               target: dict[str, Any], marker: dict[str, Any]) -> list[str]:
    """Post ``target`` then ``marker`` (occurred later), subscribe: what came before the marker."""
    now = datetime.now(timezone.utc)
    target["occurred"] = _iso(now - timedelta(seconds=2))
    marker["occurred"] = _iso(now - timedelta(seconds=1))
    post(wire, server, [target, marker])
    out = subscribe(sockets, server, {"occurred": window(), **event_filter})
    return names_until(out, marker)


# ----------------------------------------------------------------------------- 1. labels


@pytest.mark.parametrize(
    ("patterns", "target", "delivered", "marker"),
    [  # Prefect: fnmatch globs, "!" negates, ANY pattern of a label's list may match
        ("a*d", "add", True, "a*d"),
        ("a?d", "add", True, "a?d"),
        (["!add", "!sub"], "add", True, "mul"),  # "add" is not "sub"
        (["mul", "!sub"], "add", True, "mul"),
    ],
)
def test_label_patterns_are_globs_and_any_one_may_match(server, wire, sockets, patterns, target, delivered, marker):
    name = "prefect.resource.name"
    got = backfilled(server, wire, sockets, {"resource": {"labels": {name: patterns}}},
                     event("qa.parity.target", labels={name: target}), event("qa.parity.marker", labels={name: marker}))
    assert got == (["qa.parity.target"] if delivered else [])


def test_a_negated_label_never_matches_a_resource_without_that_label(server, wire, sockets):
    got = backfilled(server, wire, sockets, {"resource": {"labels": {"prefect.missing": "!x"}}},
                     event("qa.parity.target"), event("qa.parity.marker", labels={"prefect.missing": "y"}))
    assert got == []


def test_related_and_any_resource_labels_match_as_globs_too(server, wire, sockets):
    target = event("qa.parity.target")
    target["related"] = [{"prefect.resource.id": "qa.flow", "prefect.resource.role": "flow",
                          "prefect.resource.name": "nightly-etl"}]
    marker = event("qa.parity.marker", labels={"prefect.resource.name": "*-etl"})
    got = backfilled(server, wire, sockets, {"any_resource": {"labels": {"prefect.resource.name": "*-etl"}}},
                     target, marker)
    assert got == ["qa.parity.target"]


def test_an_empty_label_list_matches_nothing(server, wire, sockets):
    """No marker can match this filter: the server's 1012 close on stopping is the marker
    (sent after the backfill, on the same connection)."""
    post(wire, server, [event("qa.parity.target", labels={"prefect.resource.name": "add"})])
    out = subscribe(sockets, server, {"occurred": window(), "resource": {"labels": {"prefect.resource.name": []}}})
    subscribed(server)
    server.stop()
    out.ws.settimeout(10)
    frames = []
    while True:
        frame = out.ws.recv_frame()
        if frame.opcode == 0x8:  # close
            break
        frames.append(frame.data)
    assert frames == []
    assert int.from_bytes(frame.data[:2], "big") == 1012


# ----------------------------------------------------------------------------- 2. refused filters


@pytest.mark.parametrize(
    ("event_filter", "reason"),
    [
        ({"evnt": {"name": ["prefect.task-run.Completed"]}}, "evnt: Extra inputs are not permitted"),
        ({"event": {"nam": ["prefect.task-run.Completed"]}}, "event.nam: Extra inputs are not permitted"),
        ({"resource": {"label": {"a": "b"}}}, "resource.label: Extra inputs are not permitted"),
        ({"related": [{"roles": ["flow"]}]}, "related.0.roles: Extra inputs are not permitted"),
        ({"occurred": {**window(), "util": "2030-01-01T00:00:00Z"}}, "occurred.util: Extra inputs"),
        ({"id": {"id": ["not-a-uuid"]}}, "id.id: Input should be a list of valid UUIDs"),
        ({"id": None}, "id: Input should be a valid dictionary"),
        ({"text": {"query": "x" * 201}}, "text.query: String should have at most 200 characters"),
        ({"order": "SIDEWAYS"}, "order: Input should be 'ASC' or 'DESC'"),
        ({"resource": {"labels": {"prefect.resource.name": None}}}, "resource.labels.prefect.resource.name"),
        ({"resource": {"distinct": 2}}, "resource.distinct: Input should be a valid boolean"),
    ],
)
def test_a_filter_prefect_refuses_is_refused_1002(server, wire, sockets, event_filter, reason):
    """Accepted, a misspelt criterion would be ignored and the subscriber get every event: the
    event posted after the filter would come first instead of the close."""
    out = subscribe(sockets, server, {"occurred": window(), **event_filter})
    post(wire, server, [event("qa.parity.any")])
    out.ws.settimeout(10)
    frame = out.ws.recv_frame()
    assert frame.opcode == 0x8, f"not refused; got {frame.data[:200]!r}"
    code, text = int.from_bytes(frame.data[:2], "big"), frame.data[2:].decode()
    assert code == 1002 and text.startswith("Invalid filter: " + reason), (code, text)


# ----------------------------------------------------------------------------- 3. text search


@pytest.mark.parametrize(
    ("query", "target", "delivered", "marker"),
    [  # target: event "qa.text", resource name label "add", payload {"note": "Hello World"}
        ('"qa.text thing"', "qa.text", False, "qa.text thing"),  # a phrase, not two terms
        ("add +zzz", "qa.text", False, "qa.zzz"),  # +zzz is required
        ("+add", "qa.text", True, "qa.parity.+add"),  # required, not the text "+add"
        ("!zzz", "qa.text", True, {"note": "Hello World"}),  # !zzz only excludes
        ("prefect.resource.name", "qa.text", False, "prefect.resource.name"),  # label keys are not searched
        ('"\'note\': \'hello world\'"', "qa.text", True,  # str(payload), case-insensitive
         {"x": "'note': 'hello world'"}),
    ],
)
def test_text_query_as_prefects_parser_reads_it(server, wire, sockets, query, target, delivered, marker):
    payload = {"note": "Hello World"}
    target_event = event(target, labels={"prefect.resource.name": "add"}, payload=payload)
    # the marker matches the query by its name, or else by its payload
    marker_event = (event(marker, labels={"prefect.resource.name": "add"}) if isinstance(marker, str)
                    else event("qa.parity.marker", labels={"prefect.resource.name": "add"}, payload=marker))
    got = backfilled(server, wire, sockets, {"text": {"query": query}}, target_event, marker_event)
    assert got == ([target] if delivered else [])


# ----------------------------------------------------------------------------- 4. backfill, ids, until


@pytest.mark.parametrize("backfill", [None, 0])
def test_a_false_backfill_value_means_no_backfill(server, wire, sockets, backfill):
    """Prefect: ``if message.get("backfill", True):``; only ``false`` was honoured."""
    post(wire, server, [event("qa.parity.past", occurred=datetime.now(timezone.utc) - timedelta(seconds=5))])
    out = subscribe(sockets, server, {"occurred": window()}, backfill=backfill)
    subscribed(server)
    marker = event("qa.parity.marker")
    post(wire, server, [marker])
    assert names_until(out, marker) == []


def test_event_ids_are_compared_as_uuids(server, wire, sockets):
    target, braced, marker = event("qa.parity.target"), event("qa.parity.braced"), event("qa.parity.marker")
    ids = [target["id"].upper(), "{" + braced["id"].replace("-", "") + "}", marker["id"]]
    now = datetime.now(timezone.utc)
    for i, e in enumerate((target, braced, marker)):
        e["occurred"] = _iso(now - timedelta(seconds=3 - i))
    post(wire, server, [target, braced, marker])
    out = subscribe(sockets, server, {"occurred": window(), "id": {"id": ids}})
    assert names_until(out, marker) == ["qa.parity.target", "qa.parity.braced"]


@pytest.mark.parametrize("occurred", ["since only", "empty"])
def test_occurred_without_until_ends_when_the_filter_is_read(server, wire, sockets, occurred):
    """Prefect's EventOccurredFilter.until defaults to now (when the filter is parsed): an
    event that occurs after subscribing is not delivered, an older one sent later is."""
    before = datetime.now(timezone.utc) - timedelta(seconds=30)
    spec = {"since": _iso(datetime.now(timezone.utc) - timedelta(minutes=1))} if occurred == "since only" else {}
    out = subscribe(sockets, server, {"occurred": spec, "event": {"prefix": ["qa.parity."]}}, backfill=False)
    subscribed(server)
    marker = event("qa.parity.marker", occurred=before)
    post(wire, server, [event("qa.parity.live")])  # occurred now: after the filter was read
    post(wire, server, [marker])
    assert names_until(out, marker) == []
