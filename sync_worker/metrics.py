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

Memory: prometheus-client (and the HTTP modules it imports) is imported when a metric is first
touched, not with this module. ``sync-worker worker`` with the client metrics server off calls
:func:`record_in_this_process(False) <record_in_this_process>` before touching any: nothing
could read the registry of that process (it has no other ``/metrics`` endpoint), so its metrics
are no-ops and prometheus-client is never imported (measured: 35.6 -> 34.7 MB RSS). Library use
(a TaskWorker in a host application) records as before.
"""
from __future__ import annotations

import threading
from typing import Any

#: Every metric of this module: attribute name -> (kind, Prometheus name, help, labels).
_DEFINITIONS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "RUNS_RECEIVED": ("counter", "sync_worker_task_runs_received",
                      "Task runs delivered to this worker by the subscription.", ("task_key",)),
    "RUNS_STARTED": ("counter", "sync_worker_task_runs_started",
                     "Task runs this worker moved to RUNNING and began executing.", ("task_key",)),
    "RUNS_COMPLETED": ("counter", "sync_worker_task_runs_completed",
                       "Task runs this worker finished in state COMPLETED.", ("task_key",)),
    "RUNS_FAILED": ("counter", "sync_worker_task_runs_failed",
                    "Task runs this worker finished in state FAILED (no retries left).", ("task_key",)),
    "RUNS_RETRIED": ("counter", "sync_worker_task_runs_retried",
                     "Task runs that failed on this worker and were scheduled for a retry.", ("task_key",)),
    "RUNS_IN_FLIGHT": ("gauge", "sync_worker_task_runs_in_flight",
                       "Task runs currently held by this worker (acknowledged, not finished).", ()),
    "FREE_SLOTS": ("gauge", "sync_worker_free_slots", "Execution slots currently free on this worker.", ()),
    "RUN_DURATION": ("histogram", "sync_worker_task_run_duration_seconds",
                     "Seconds spent executing the task function, per run.", ("task_key",)),
    "SUBSCRIPTION_CONNECTS": ("counter", "sync_worker_subscription_connects",
                              "Successful websocket subscriptions (first connection and reconnections).", ()),
    "SUBSCRIPTION_RECONNECTS": ("counter", "sync_worker_subscription_reconnects",
                                "Successful websocket subscriptions after the first one in this process.", ()),
    "SERVICE_LOOP_ERRORS": ("counter", "sync_worker_service_loop_errors",
                            "Intermittent errors tolerated by critical_service_loop, by exception class.",
                            ("exception",)),
}

__all__ = sorted(_DEFINITIONS) + ["record_in_this_process"]

_lock = threading.Lock()
_recording = True
_made = False


def record_in_this_process(on: bool) -> bool:
    """Whether this process records metrics, decided before any metric is touched.

    ``False`` (``sync-worker worker`` without the client metrics server): every metric is a
    no-op and prometheus-client is not imported. Returns whether the choice took effect:
    once the metrics exist they stay as they are (registered metrics cannot be taken back)."""
    global _recording
    with _lock:
        if _made:
            return on == _recording
        _recording = on
        return True


class _NullMetric:
    """A metric that records nothing (``record_in_this_process(False)``)."""

    __slots__ = ()

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> _NullMetric:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


def _make() -> None:
    global _made
    with _lock:
        if _made:
            return
        if _recording:
            made = _prometheus_metrics()
        else:
            made = {name: _NullMetric() for name in _DEFINITIONS}
        globals().update(made)
        _made = True


def _prometheus_metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    class _CachedLabelsMixin:
        """``labels()`` from a per-metric dict after the first call with the same values.

        The dict is only a shortcut to prometheus-client's own children: a race creates
        nothing twice (the library's ``labels`` under its lock answers both), and
        ``remove``/``clear`` forget the shortcut too."""

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

    made: dict[str, Any] = {}
    for name, (kind, series, documentation, labels) in _DEFINITIONS.items():
        if kind == "counter":
            cls: Any = _Counter if labels else Counter
        elif kind == "histogram":
            cls = _Histogram
        else:
            cls = Gauge
        made[name] = cls(series, documentation, list(labels))
    return made


def __getattr__(name: str) -> Any:
    """The metrics are made on first use (PEP 562); afterwards they are plain module globals."""
    if name in _DEFINITIONS:
        _make()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
