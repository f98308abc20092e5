from __future__ import annotations

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
