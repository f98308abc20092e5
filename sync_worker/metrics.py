"""Prometheus metrics of a sync_worker client process (worker, services).

All metrics live in prometheus-client's default registry, so the client metrics server
(:func:`sync_worker.services.start_client_metrics_server`) or any existing
``/metrics`` endpoint of the host application exposes them without extra wiring.

=========================  ==================================================  =========
Name (Python)              Prometheus series                                   Type
=========================  ==================================================  =========
RUNS_RECEIVED              sync_worker_task_runs_received_total{task_key}      counter
RUNS_STARTED               sync_worker_task_runs_started_total{task_key}       counter
RUNS_COMPLETED             sync_worker_task_runs_completed_total{task_key}     counter
RUNS_FAILED                sync_worker_task_runs_failed_total{task_key}        counter
RUNS_RETRIED               sync_worker_task_runs_retried_total{task_key}       counter
RUNS_IN_FLIGHT             sync_worker_task_runs_in_flight                     gauge
FREE_SLOTS                 sync_worker_free_slots                              gauge
RUN_DURATION               sync_worker_task_run_duration_seconds{task_key}     histogram
SUBSCRIPTION_CONNECTS      sync_worker_subscription_connects_total             counter
SUBSCRIPTION_RECONNECTS    sync_worker_subscription_reconnects_total           counter
SERVICE_LOOP_ERRORS        sync_worker_service_loop_errors_total{exception}    counter
=========================  ==================================================  =========

Meaning:

- received: task runs delivered to this worker over the subscription socket
  (before the slot reservation / ack), one per delivery, duplicates included.
- started: runs this worker moved to RUNNING and began executing.
- completed / failed: runs whose final proposal from this worker was COMPLETED / FAILED
  (a failure that the server turned into a retry counts as ``retried``, not ``failed``).
- retried: runs that failed and were scheduled again (``AwaitingRetry``).
- in_flight: runs currently held by this worker (acknowledged, not yet finished).
- free_slots: execution slots currently free (the concurrency limit minus reserved slots).
- run_duration: wall-clock seconds spent calling the task function, per run.
- subscription connects / reconnects: successful websocket subscriptions; reconnects
  counts every one after the first in the process (a flapping link shows up here).
- service_loop_errors: intermittent errors swallowed by ``critical_service_loop``,
  labelled with the exception's class name.

Counters are declared without the ``_total`` suffix: prometheus-client appends it (and
also exposes a ``_created`` series) — the names above are what a scrape shows.

Cost: every run updates six to eight of these. Recording stays on whether or not the client
metrics server runs (``SYNC_WORKER_CLIENT_METRICS_ENABLED``), because a host application's own
``/metrics`` endpoint reads the same default registry without that setting; instead the
labelled metrics answer ``.labels(task_key=...)`` from a dict of the children they already
made (prometheus-client validates the labels and takes a lock on every call): ~1.5 µs per
labelled update instead of ~7.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram


class _CachedLabelsMixin:
    """``labels()`` from a per-metric dict after the first call with the same values.

    The dict is only a shortcut to prometheus-client's own children: a race creates nothing
    twice (the library's ``labels`` under its lock answers both), and ``remove``/``clear``
    forget the shortcut too."""

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        key = (labelvalues, tuple(labelkwargs.items()))
        children = self.__dict__.setdefault("_sync_worker_children", {})
        child = children.get(key)
        if child is None:
            child = children[key] = super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]
        return child

    def remove(self, *labelvalues: Any) -> None:
        self.__dict__.pop("_sync_worker_children", None)
        super().remove(*labelvalues)  # type: ignore[misc]

    def clear(self) -> None:
        self.__dict__.pop("_sync_worker_children", None)
        super().clear()  # type: ignore[misc]


class _Counter(_CachedLabelsMixin, Counter):
    pass


class _Histogram(_CachedLabelsMixin, Histogram):
    pass

__all__ = [
    "FREE_SLOTS",
    "RUNS_COMPLETED",
    "RUNS_FAILED",
    "RUNS_IN_FLIGHT",
    "RUNS_RECEIVED",
    "RUNS_RETRIED",
    "RUNS_STARTED",
    "RUN_DURATION",
    "SERVICE_LOOP_ERRORS",
    "SUBSCRIPTION_CONNECTS",
    "SUBSCRIPTION_RECONNECTS",
]

RUNS_RECEIVED = _Counter(
    "sync_worker_task_runs_received",
    "Task runs delivered to this worker by the subscription.",
    ["task_key"],
)
RUNS_STARTED = _Counter(
    "sync_worker_task_runs_started",
    "Task runs this worker moved to RUNNING and began executing.",
    ["task_key"],
)
RUNS_COMPLETED = _Counter(
    "sync_worker_task_runs_completed",
    "Task runs this worker finished in state COMPLETED.",
    ["task_key"],
)
RUNS_FAILED = _Counter(
    "sync_worker_task_runs_failed",
    "Task runs this worker finished in state FAILED (no retries left).",
    ["task_key"],
)
RUNS_RETRIED = _Counter(
    "sync_worker_task_runs_retried",
    "Task runs that failed on this worker and were scheduled for a retry.",
    ["task_key"],
)
RUNS_IN_FLIGHT = Gauge(
    "sync_worker_task_runs_in_flight",
    "Task runs currently held by this worker (acknowledged, not finished).",
)
FREE_SLOTS = Gauge(
    "sync_worker_free_slots",
    "Execution slots currently free on this worker.",
)
RUN_DURATION = _Histogram(
    "sync_worker_task_run_duration_seconds",
    "Seconds spent executing the task function, per run.",
    ["task_key"],
)
SUBSCRIPTION_CONNECTS = Counter(
    "sync_worker_subscription_connects",
    "Successful websocket subscriptions (first connection and reconnections).",
)
SUBSCRIPTION_RECONNECTS = Counter(
    "sync_worker_subscription_reconnects",
    "Successful websocket subscriptions after the first one in this process.",
)
SERVICE_LOOP_ERRORS = _Counter(
    "sync_worker_service_loop_errors",
    "Intermittent errors tolerated by critical_service_loop, by exception class.",
    ["exception"],
)
