from __future__ import annotations

import os
import re

import pytest

from sync_worker.settings import DEFAULT_API_URL, SettingsError, get_settings


def test_defaults():
    settings = get_settings({})
    assert settings.api_url == DEFAULT_API_URL
    assert settings.auth_string is None
    assert settings.allow_pickle is False
    assert settings.delete_failed_submissions is True
    assert settings.client_metrics_port == 4201


def test_prefect_variables_are_the_fallback():
    env = {"PREFECT_API_URL": "http://prefect:4200/api/", "PREFECT_API_AUTH_STRING": "admin:pw", "PREFECT_API_KEY": "k"}
    settings = get_settings(env)
    assert settings.api_url == "http://prefect:4200/api"
    assert settings.auth_string == "admin:pw"
    assert settings.api_key == "k"


def test_sync_worker_variables_win():
    env = {"PREFECT_API_URL": "http://prefect/api", "SYNC_WORKER_API_URL": "http://mine/api",
           "PREFECT_CLIENT_METRICS_PORT": "9000", "SYNC_WORKER_CLIENT_METRICS_PORT": "9100"}
    settings = get_settings(env)
    assert settings.api_url == "http://mine/api"
    assert settings.client_metrics_port == 9100


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False)])
def test_booleans(value, expected):
    assert get_settings({"SYNC_WORKER_ALLOW_PICKLE": value}).allow_pickle is expected


def test_bad_values_name_the_variable():
    with pytest.raises(SettingsError, match="SYNC_WORKER_ALLOW_PICKLE='maybe'"):
        get_settings({"SYNC_WORKER_ALLOW_PICKLE": "maybe"})
    with pytest.raises(SettingsError, match="PREFECT_CLIENT_METRICS_PORT='http'"):
        get_settings({"PREFECT_CLIENT_METRICS_PORT": "http"})


def test_storage_server_mode():
    assert get_settings({"SYNC_WORKER_STORAGE": "server"}).uses_server_storage
    assert not get_settings({"SYNC_WORKER_STORAGE": "/tmp/x"}).uses_server_storage


def test_storage_falls_back_to_prefects_directory():
    assert get_settings({"PREFECT_RESULTS_LOCAL_STORAGE_PATH": "/p"}).storage == "/p"
    assert get_settings({"PREFECT_RESULTS_LOCAL_STORAGE_PATH": "/p", "SYNC_WORKER_STORAGE": "/s"}).storage == "/s"


def test_fast_path_switch():
    assert get_settings({}).fast_path is True
    assert get_settings({"SYNC_WORKER_FAST_PATH": "false"}).fast_path is False
    with pytest.raises(SettingsError, match="SYNC_WORKER_FAST_PATH='maybe'"):
        get_settings({"SYNC_WORKER_FAST_PATH": "maybe"})


def test_submit_timeout_setting():
    assert get_settings({}).submit_timeout == 10.0
    assert get_settings({"SYNC_WORKER_SUBMIT_TIMEOUT": "2.5"}).submit_timeout == 2.5


# -- the cache of get_settings(): cheap per .delay(), yet a changed variable counts at once --
def test_cached_settings_are_reused_while_the_environment_is_unchanged(monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_API_URL", "http://127.0.0.1:4999/api")
    first = get_settings()
    assert get_settings() is first
    assert first.api_url == "http://127.0.0.1:4999/api"


def test_a_variable_changed_at_run_time_is_seen_on_the_next_call(monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_API_URL", "http://127.0.0.1:4999/api")
    assert get_settings().api_url == "http://127.0.0.1:4999/api"
    monkeypatch.setenv("SYNC_WORKER_API_URL", "http://127.0.0.1:5000/api")
    assert get_settings().api_url == "http://127.0.0.1:5000/api"
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "u:p")
    assert get_settings().auth_string == "u:p"
    monkeypatch.delenv("PREFECT_API_AUTH_STRING")
    monkeypatch.delenv("SYNC_WORKER_API_URL")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = get_settings()
    assert settings.auth_string is None and settings.api_url == DEFAULT_API_URL


def test_every_variable_is_part_of_the_cache_key(monkeypatch):
    """Each variable listed, changed alone, gives different settings (none is forgotten)."""
    from sync_worker.settings import VARIABLES

    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    plain = get_settings()
    values = {"URL": "http://127.0.0.1:4999/api", "AUTH_STRING": "u:p", "KEY": "k", "STORAGE": "/tmp/sw-x",
              "STORAGE_PATH": "/tmp/sw-y", "PICKLE": "true", "SUBMISSIONS": "false", "TIMEOUT": "7",
              "ENABLED": "true", "PORT": "4321", "PATH": "false"}
    for name in VARIABLES:
        value = next(v for suffix, v in sorted(values.items(), key=lambda kv: -len(kv[0])) if name.endswith(suffix))
        monkeypatch.setenv(name, value)
        assert get_settings() != plain, name
        monkeypatch.delenv(name)
    assert get_settings() == plain


def test_the_key_lists_every_variable_read():
    """A variable read by the parser but missing from VARIABLES would be cached stale."""
    import inspect
    import re

    from sync_worker import settings as module

    source = inspect.getsource(module._read) + inspect.getsource(module._checked)
    read = set(re.findall(r'"((?:SYNC_WORKER|PREFECT)_[A-Z_]+)"', source))
    assert read and read == set(module.VARIABLES)


def test_an_invalid_value_raises_on_every_call(monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_REQUEST_TIMEOUT", "abc")
    for _ in range(2):
        with pytest.raises(SettingsError, match="SYNC_WORKER_REQUEST_TIMEOUT='abc'"):
            get_settings()
    monkeypatch.setenv("SYNC_WORKER_REQUEST_TIMEOUT", "3")
    assert get_settings().request_timeout == 3.0


def test_a_replaced_os_environ_is_read(monkeypatch):
    import os

    monkeypatch.setattr(os, "environ", {"SYNC_WORKER_API_URL": "http://127.0.0.1:4998/api"})
    assert get_settings().api_url == "http://127.0.0.1:4998/api"
    os.environ["SYNC_WORKER_API_URL"] = "http://127.0.0.1:4997/api"
    assert get_settings().api_url == "http://127.0.0.1:4997/api"


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0"])
def test_a_submit_timeout_that_is_not_a_positive_number_is_refused(value):
    """nan made .delay() retry in a hot loop forever, inf raised OverflowError."""
    with pytest.raises(SettingsError, match=f"SYNC_WORKER_SUBMIT_TIMEOUT='{value}' must be a number of seconds > 0"):
        get_settings({"SYNC_WORKER_SUBMIT_TIMEOUT": value})


@pytest.mark.parametrize("url,why", [
    ("http://127.0.0.1:99999/api", "Port out of range"),
    ("http://127.0.0.1:abc/api", "Port could not be cast"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://:4200/api", "is not an http(s) URL"),
])
def test_an_api_url_with_a_bad_port_or_host_is_refused(url, why):
    with pytest.raises(SettingsError, match=rf"SYNC_WORKER_API_URL='{re.escape(url)}' .*{re.escape(why)}"):
        get_settings({"SYNC_WORKER_API_URL": url})


def test_the_commands_refuse_a_bad_api_url_in_one_line():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNC_WORKER_", "PREFECT_"))}
    for args, extra in [(["runs", "ls", "--api-url", "http://127.0.0.1:99999/api"], {}),
                        (["status"], {"SYNC_WORKER_API_URL": "http://[::1"})]:
        out = subprocess.run([sys.executable, "-m", "sync_worker", *args], capture_output=True, text=True,
                             timeout=60, env={**env, **extra})
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
