"""Browsers cannot drive the server: Host (DNS rebinding), Origin (REST and both websockets) and
Content-Type checks, and the options that allow a deliberate setup."""
from __future__ import annotations

import argparse
import json
import socket

import pytest
import requests
import websocket
from tests.server.conftest import Wire

from sync_worker.server.cli import configure_parser

pytestmark = pytest.mark.timeout(60)

SUB = "/task_runs/subscriptions/scheduled"
RPC = "/sync_worker/rpc"


def count(server) -> int:
    return server.db.count_runs()


def body(_wire: object = None) -> str:
    return json.dumps(Wire("http://unused").create_body())


def test_a_text_plain_post_from_a_web_page_creates_nothing(server, wire):
    response = requests.post(server.url + "/task_runs/", data=body(), timeout=10,
                             headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert response.status_code == 403
    assert "Origin 'http://evil.example'" in response.json()["detail"]
    assert "--allowed-origin" in response.json()["detail"]
    assert count(server) == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_writes_require_json_content_type(server, wire, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(server.url + "/task_runs/", data=body().encode(), headers=headers, timeout=10)
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["detail"]
    assert count(server) == 0
    ok = requests.post(server.url + "/task_runs/", data=body(), timeout=10,
                       headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 201


def raw_get(port: int, host: str, path: str = "/api/health", extra: str = "") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data.decode("latin-1")
            data += chunk


def test_a_foreign_host_is_refused_dns_rebinding(server):
    answer = raw_get(server.port, f"evil.example:{server.port}")
    assert answer.startswith("HTTP/1.1 403")
    assert "Host 'evil.example:" in answer and "--allowed-host evil.example" in answer
    # a DNS-rebinding page is same-origin with itself: Origin matching Host does not help it
    answer = raw_get(server.port, f"evil.example:{server.port}", extra=f"Origin: http://evil.example:{server.port}\r\n")
    assert answer.startswith("HTTP/1.1 403")


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "[::1]:{port}", "10.1.2.3",
                                  "127.0.0.1"])
def test_own_names_and_ip_addresses_are_answered(server, host):
    assert raw_get(server.port, host.format(port=server.port)).startswith("HTTP/1.1 200")


def test_allowed_host_and_origin_options(server_factory):
    server = server_factory(allowed_hosts=["queue.internal"], allowed_origins=["https://dash.example"])
    assert raw_get(server.port, f"queue.internal:{server.port}").startswith("HTTP/1.1 200")
    assert raw_get(server.port, "other.internal").startswith("HTTP/1.1 403")
    ok = requests.post(server.url + "/task_runs/", data=body(), timeout=10,
                       headers={"Content-Type": "application/json", "Origin": "https://dash.example"})
    assert ok.status_code == 201
    refused = requests.get(server.url + "/health", headers={"Origin": "https://other.example"}, timeout=10)
    assert refused.status_code == 403


def test_star_allows_any_host_and_origin(server_factory):
    server = server_factory(allowed_hosts=["*"], allowed_origins=["*"])
    assert raw_get(server.port, "anything.example", extra="Origin: http://x.example\r\n").startswith("HTTP/1.1 200")


def test_reading_is_refused_to_web_pages_too(server, wire):
    run = wire.create()
    response = requests.get(f"{server.url}/task_runs/{run['id']}", headers={"Origin": "http://evil.example"},
                            timeout=10)
    assert response.status_code == 403
    assert run["id"] not in response.text


@pytest.mark.parametrize("path", [SUB, RPC])
def test_websockets_from_a_foreign_origin_or_host_are_refused(server, path):
    url = server.url.replace("http://", "ws://") + path
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, subprotocols=["prefect"], origin="http://evil.example", timeout=10)
    assert refused.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, subprotocols=["prefect"], host=f"evil.example:{server.port}", timeout=10)
    assert refused.value.status_code == 403
    assert server.stats()["subscriptions"] == 0


@pytest.mark.parametrize("base", ["ws://127.0.0.1:{port}/api", "ws://localhost:{port}/api"])
def test_websocket_client_default_origin_is_accepted(server, base):
    """websocket-client sends ``Origin: http://<host:port>`` by default: our worker must pass."""
    ws = websocket.create_connection(base.format(port=server.port) + SUB, subprotocols=["prefect"], timeout=10)
    try:
        ws.send(json.dumps({"type": "auth", "token": None}))
        assert json.loads(ws.recv())["type"] == "auth_success"
    finally:
        ws.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_our_client_is_not_refused(server, wire, host):
    """REST with JSON bodies, records (octet-stream PUT) and the rpc socket (websocket-client's
    default Origin) all pass the checks, under either name of the machine."""
    from sync_worker.client import Client

    client = Client(api_url=f"http://{host}:{server.port}/api", retry_attempts=1)
    try:
        run = client.create_task_run(wire.create_body())  # over the rpc socket
        assert client.rpc is not None
        assert client.read_task_run(run.id).id == run.id
        client.write_record("k1", b"\x00bytes")
        assert client.read_record("k1") == b"\x00bytes"
        assert client.health()
    finally:
        client.close()


def test_cli_options():
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--allowed-host", "a.example", "--allowed-host", "b.example",
                              "--allowed-origin", "https://c.example"])
    assert args.allowed_host == ["a.example", "b.example"]
    assert args.allowed_origin == ["https://c.example"]
