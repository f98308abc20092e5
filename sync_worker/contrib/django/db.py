"""Database hygiene around each run, as Celery's Django fixup does it.

A worker's threads live for hours; the database does not keep an idle connection that
long (PostgreSQL's ``idle_session_timeout``, MySQL's ``wait_timeout``, a pgbouncer or a
failover). Django's own request cycle calls ``close_old_connections()`` at the start and
end of every request; a worker has no requests, so the runner does it around every run:

- before: ``close_old_connections()`` drops connections that are past ``CONN_MAX_AGE``
  or broke in an earlier run, so the task opens a fresh one instead of failing on a
  connection the server has closed;
- after: a transaction the task left open (``set_autocommit(False)`` without a commit,
  or an ``atomic()`` entered by hand) is rolled back, never committed and never carried
  into the next run; a connection that raised a database error is closed (SQLite's
  backend reports every connection as usable, so "close if unusable" is not enough);
  then ``close_old_connections()`` again, so with ``CONN_MAX_AGE = 0`` (Django's default)
  no connection stays open between runs.

Django's connections are per thread, so each executor thread has its own: none is ever
shared across threads.
"""
from __future__ import annotations

import logging

from django.db import DatabaseError, InterfaceError, close_old_connections, connections

logger = logging.getLogger("sync_worker.contrib.django")


def before_run() -> None:
    close_old_connections()


def after_run(error: BaseException | None = None) -> None:
    broken = isinstance(error, (DatabaseError, InterfaceError))
    for conn in connections.all(initialized_only=True):
        try:
            if conn.connection is None:
                continue
            if conn.in_atomic_block:
                logger.error("A task left an atomic block open on database %r; rolling it back and "
                             "closing the connection", conn.alias)
                _discard(conn)
                continue
            if not conn.get_autocommit():
                logger.warning("A task left autocommit off on database %r with a transaction open; rolling "
                               "it back", conn.alias)
                conn.rollback()
                conn.set_autocommit(True)
            if broken:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - a connection we cannot reset is dropped
            logger.warning("Could not reset the connection to %r after a run (%s); dropping it", conn.alias, exc)
            _discard(conn)
    close_old_connections()


def _discard(conn: object) -> None:
    """Close the connection and forget its wrapper: the thread's next query starts clean."""
    alias = getattr(conn, "alias", None)
    try:
        raw = getattr(conn, "connection", None)
        if raw is not None:
            raw.close()  # rolls back whatever was open
    except Exception as exc:  # noqa: BLE001 - it is being thrown away anyway
        logger.debug("Closing the connection to %r failed: %s", alias, exc)
    if alias is not None:
        try:
            del connections[alias]
        except AttributeError:
            pass
