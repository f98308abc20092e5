"""The example project's worker on PostgreSQL: the ORM write, and the case SQLite can only
imitate: the database server itself terminates the worker's idle connection
(``idle_session_timeout``), and the next run must still succeed."""
from __future__ import annotations

from typing import Any

import pytest

from tests.django.conftest import wait_finished
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

APPLICATION = "sync_worker_e2e"


def _query(postgres: dict[str, str], sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg2

    connection = psycopg2.connect(host=postgres["DJANGO_DB_HOST"], port=int(postgres["DJANGO_DB_PORT"]),
                                  user=postgres["DJANGO_DB_USER"], dbname=postgres["DJANGO_DB_NAME"])
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        connection.close()


def _worker_sessions(postgres: dict[str, str]) -> int:
    return _query(postgres, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", APPLICATION)[0][0]


def test_worker_writes_the_row_in_postgres(postgres: dict[str, str], start_worker: Any) -> None:
    from notes.tasks import create_note

    result = create_note.enqueue("stored in PostgreSQL")
    worker = start_worker("--limit", "2", env=postgres)
    wait_finished(result)
    assert result.status == "SUCCESSFUL", worker.output()
    rows = _query(postgres, "SELECT id FROM notes_note WHERE text = %s", "stored in PostgreSQL")
    assert rows == [(result.return_value,)]


def test_run_after_the_server_killed_the_idle_connection(postgres: dict[str, str], start_worker: Any) -> None:
    """Persistent connections with health checks (CONN_MAX_AGE=None, CONN_HEALTH_CHECKS):
    PostgreSQL ends the worker thread's session after 1 s idle. close_old_connections()
    before the next run makes Django check the connection and open a new one."""
    from notes.tasks import create_note

    env = {**postgres, "DJANGO_CONN_MAX_AGE": "none", "DJANGO_CONN_HEALTH_CHECKS": "1",
           "DJANGO_PG_OPTIONS": f"-c idle_session_timeout=1000 -c application_name={APPLICATION}"}
    worker = start_worker("--limit", "1", env=env)  # one thread, so the second run gets that connection
    first = wait_finished(create_note.enqueue("before the server closed the session"))
    assert first.status == "SUCCESSFUL", worker.output()
    assert _worker_sessions(postgres) == 1  # kept open: CONN_MAX_AGE=None
    wait_for(lambda: _worker_sessions(postgres) == 0, timeout=30)  # terminated by the server

    second = wait_finished(create_note.enqueue("after the server closed the session"))
    assert second.status == "SUCCESSFUL", (second.errors, worker.output())
    assert _query(postgres, "SELECT count(*) FROM notes_note WHERE text = %s",
                  "after the server closed the session") == [(1,)]


def test_transaction_left_open_is_rolled_back_in_postgres(postgres: dict[str, str], start_worker: Any) -> None:
    from notes.tasks import create_note, write_without_commit

    worker = start_worker("--limit", "1", env={**postgres, "DJANGO_CONN_MAX_AGE": "none"})
    assert wait_finished(write_without_commit.enqueue("pg: never committed")).status == "SUCCESSFUL"
    assert wait_finished(create_note.enqueue("pg: committed")).status == "SUCCESSFUL", worker.output()
    assert _query(postgres, "SELECT count(*) FROM notes_note WHERE text = %s", "pg: never committed") == [(0,)]
    assert _query(postgres, "SELECT count(*) FROM notes_note WHERE text = %s", "pg: committed") == [(1,)]
    # nothing of the worker sits "idle in transaction" holding locks
    assert _query(postgres, "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'") == [(0,)]
