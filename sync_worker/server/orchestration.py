"""Orchestration: what happens when a state is proposed for a task run.

The rules are a TABLE (:data:`RULES`), read top to bottom; the first row whose "from" and
"proposed" columns match decides. ``force=true`` skips the table and accepts.

======================  =====================================  ==========================================
Current state           Proposed state                         Result
======================  =====================================  ==========================================
PENDING, RUNNING        PENDING                                ABORT: the run is already claimed (a
                                                               second worker's claim fails)
COMPLETED, FAILED,      PENDING, RUNNING                       REJECT with the current state: a
CANCELLED, CRASHED                                             late/duplicate delivery never runs twice
                                                               (a Prefect server accepts this)
RUNNING                 RUNNING                                ABORT: already running
COMPLETED, FAILED,      any other state                        REJECT with the current state (use
CANCELLED, CRASHED                                             force=true to override)
RUNNING                 FAILED, retries left                   REJECT with SCHEDULED "AwaitingRetry"
                        (attempts <= retries, not              (message kept, scheduled_time = now +
                        retriable=false)                       retry_delay[attempt] with jitter); the run
                                                               goes back on the queue when due
anything else           anything                               ACCEPT
======================  =====================================  ==========================================

``attempts`` is ``run_count`` less the deliveries re-queued because their worker's lease ran
out (they are counted by ``max_deliveries``, not by ``retries``).

Effects of an accepted state:

- RUNNING: run_count + 1; start_time set the first time; named "Retrying" after the first
  attempt (as Prefect does).
- COMPLETED/FAILED/CANCELLED/CRASHED: end_time and total_run_time set.
- SCHEDULED: scheduled_time defaults to now; a background (deferred) run is queued on its
  task_key and delivered when due.
- every state gets a new id and timestamp; task_parameters_id is carried over from the
  previous state when the proposal has none (a retried run can still find its parameters).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .models import (
    _STATE_DETAILS_DEFAULTS,
    _STATE_DETAILS_KEYS,
    DEFAULT_STATE_NAMES,
    STATE_TYPES,
    TERMINAL,
    epoch,
    iso,
    make_state,
    new_id,
    parse_time,
)

ANY: frozenset[str | None] = frozenset(STATE_TYPES) | {None}

ACCEPT = "ACCEPT"
REJECT = "REJECT"
ABORT = "ABORT"
WAIT = "WAIT"  # Prefect-compatible mode only: propose again after details.delay_seconds
RETRY = "RETRY"  # REJECT into AwaitingRetry when retries are left, else ACCEPT


@dataclass(frozen=True)
class Rule:
    """One row of the table: from-states x proposed states -> action (+ reason)."""

    from_states: frozenset[str | None]
    to_states: frozenset[str]
    action: str
    reason: str = ""


RULES: tuple[Rule, ...] = (
    Rule(frozenset({"PENDING", "RUNNING"}), frozenset({"PENDING"}), ABORT,
         "This run is already {current}: another worker claimed it."),
    Rule(TERMINAL, frozenset({"PENDING", "RUNNING"}), REJECT,
         "This run is already {current}; it will not run again."),
    Rule(frozenset({"RUNNING"}), frozenset({"RUNNING"}), ABORT,
         "This run is already RUNNING."),
    Rule(TERMINAL, frozenset(STATE_TYPES), REJECT,
         "This run is already in the terminal state {current}; use force=true to override."),
    Rule(frozenset({"RUNNING"}), frozenset({"FAILED"}), RETRY, "Retrying"),
    Rule(ANY, frozenset(STATE_TYPES), ACCEPT),
)


def _match(current: str | None, proposed: str) -> Rule:
    for rule in RULES:
        if current in rule.from_states and proposed in rule.to_states:
            return rule
    raise AssertionError("the last rule matches everything")  # pragma: no cover


#: the table above, looked up once per (current, proposed) pair instead of scanned per proposal
_MATCH = {(current, proposed): _match(current, proposed) for current in ANY for proposed in STATE_TYPES}


def match(current: str | None, proposed: str) -> Rule:
    """The first row of :data:`RULES` for a current and a proposed state type."""
    return _MATCH.get((current, proposed)) or _match(current, proposed)


#: the details of every accepted proposal (one object, so its text is made once: see core.py);
#: never modified
ACCEPT_DETAILS: dict[str, Any] = {"type": "accept_details"}


@dataclass(slots=True)
class Decision:
    """The orchestration result, and what the server must do with the run."""

    status: str  # ACCEPT | REJECT | ABORT | WAIT
    state: dict[str, Any]  # the state returned to the caller
    details: dict[str, Any]
    changed: bool  # the run's state was replaced by ``state``
    queue: bool = False  # the run is now SCHEDULED on the queue
    due: float = 0.0  # when (epoch seconds) it may be delivered


def retry_delay(policy: dict[str, Any], run_count: int) -> float:
    """Seconds before the next attempt: ``retry_delay`` (number, or list indexed by attempt),
    with ``retry_jitter_factor`` spreading it by up to +/- that fraction."""
    delay = policy.get("retry_delay")
    if isinstance(delay, list):
        base = float(delay[min(max(run_count - 1, 0), len(delay) - 1)]) if delay else 0.0
    else:
        base = float(delay or 0)
    jitter = policy.get("retry_jitter_factor")
    if jitter and base > 0:
        base = max(0.0, base * (1.0 + random.uniform(-1.0, 1.0) * float(jitter)))
    return base


def orchestrate(run: dict[str, Any], proposed: dict[str, Any], force: bool, now: float,
                background: bool, lost: int = 0) -> Decision:
    """Apply the table to ``run`` (a stored TaskRun dict, modified in place when the state
    changes). ``proposed`` comes from :func:`models.validate_state`; ``background`` says the
    run was created deferred (it goes back on the queue when rescheduled).

    ``lost``: the deliveries re-queued because their worker's lease ran out. Their RUNNING
    counts in ``run_count`` (the history shows it) but not as an attempt of the retry rule:
    ``retries`` is for failures the task reported; lost workers are what ``max_deliveries``
    counts. (A claim at delivery is RUNNING before the function starts: a worker paused or
    killed before it started the run cost the run a retry.)"""
    current_state = run.get("state")
    current = current_state["type"] if current_state else None
    target = proposed["type"]
    rule = RULES[-1] if force else (_MATCH.get((current, target)) or _match(current, target))
    action = rule.action
    if action == ACCEPT and target in _PLAIN_TARGETS and current_state:
        pdetails = proposed["state_details"]
        if not pdetails or pdetails.keys() <= _STATE_DETAILS_KEYS:
            return _accept_plain(run, current_state, proposed, pdetails, target, now)
    reason = rule.reason.format(current=current) if rule.reason else None

    if action == ABORT:
        return Decision(ABORT, current_state, {"type": "abort_details", "reason": reason}, changed=False)
    if action == REJECT:
        return Decision(REJECT, current_state, {"type": "reject_details", "reason": reason}, changed=False)

    run_id = run["id"]
    details = dict(proposed["state_details"])
    previous_details = current_state["state_details"] if current_state else {}
    if not details.get("task_parameters_id") and previous_details.get("task_parameters_id"):
        details["task_parameters_id"] = previous_details["task_parameters_id"]

    if action == RETRY:
        policy = run.get("empirical_policy") or {}
        retries = policy.get("retries")
        attempts = max(1, run.get("run_count", 0) - lost)
        if details.get("retriable") is not False and retries is not None and attempts <= retries:
            due = now + retry_delay(policy, attempts)
            details["deferred"] = background or bool(details.get("deferred"))
            state = make_state("SCHEDULED", run_id, now, name="AwaitingRetry", message=proposed["message"],
                               data=proposed["data"], details=details, scheduled_time=due)
            _apply(run, state, now)
            queue = bool(details["deferred"])
            return Decision(REJECT, state, {"type": "reject_details", "reason": "Retrying"}, changed=True,
                            queue=queue, due=due)

    name = proposed["name"]
    scheduled_time = None
    if target == "SCHEDULED":
        scheduled_time = proposed["scheduled_time"] if proposed["scheduled_time"] is not None else now
    elif target == "PENDING" and current == "SCHEDULED" and previous_details.get("scheduled_time"):
        details.setdefault("scheduled_time", previous_details["scheduled_time"])
    if target == "RUNNING":
        name = _count_run(run, name)
    state = make_state(target, run_id, now, name=name, message=proposed["message"], data=proposed["data"],
                       details=details, scheduled_time=scheduled_time)
    if target == "RUNNING" and run.get("start_time") is None:
        run["start_time"] = state["timestamp"]  # iso(now)
    _apply(run, state, now)
    queue = target == "SCHEDULED" and (background or bool(details.get("deferred")))
    return Decision(ACCEPT, state, ACCEPT_DETAILS, True, queue, scheduled_time or now)


#: targets :func:`_accept_plain` takes: neither SCHEDULED nor PENDING (their scheduled times)
_PLAIN_TARGETS = STATE_TYPES - {"SCHEDULED", "PENDING"}


def _accept_plain(run: dict[str, Any], current_state: dict[str, Any], proposed: dict[str, Any],
                  pdetails: dict[str, Any], target: str, now: float) -> Decision:
    """:func:`orchestrate`'s ACCEPT of a state other than SCHEDULED and PENDING, for a run
    that has a state, whose proposed details hold only known keys: the claim and the final
    state of every run. The same run and answer as the general path (``make_state`` and
    ``_apply`` written out for this case; ``tests/server/test_server_srv16_orchestration.py``
    compares them), with a third fewer instructions."""
    state_details = _STATE_DETAILS_DEFAULTS.copy() if not pdetails else {**_STATE_DETAILS_DEFAULTS, **pdetails}
    if not state_details["task_parameters_id"]:
        carried = current_state["state_details"].get("task_parameters_id")
        if carried:
            state_details["task_parameters_id"] = carried
    state_details["task_run_id"] = run["id"]
    name = proposed["name"]
    if target == "RUNNING":
        name = _count_run(run, name)
    stamp = iso(now)
    state = {
        "data": proposed["data"],
        "id": new_id(),
        "message": proposed["message"],
        "name": name or DEFAULT_STATE_NAMES[target],
        "state_details": state_details,
        "timestamp": stamp,
        "type": target,
    }
    if target == "RUNNING" and run.get("start_time") is None:
        run["start_time"] = stamp
    # _apply
    run["state"] = state
    run["state_id"] = state["id"]
    run["state_name"] = state["name"]
    run["state_type"] = target
    run["updated"] = stamp
    run["next_scheduled_start_time"] = None
    if target in TERMINAL:
        _ended(run, stamp, now)
    return Decision(ACCEPT, state, ACCEPT_DETAILS, True, False, now)


def _count_run(run: dict[str, Any], name: str | None) -> str | None:
    """A RUNNING state: one more run of ``run``; the state's name (a run's second start
    named by default, or "Running", is "Retrying")."""
    run_count = run["run_count"] = run.get("run_count", 0) + 1
    if run_count > 1 and (name is None or name == "Running"):
        return "Retrying"
    return name


def _apply(run: dict[str, Any], state: dict[str, Any], now: float) -> None:
    """Make ``state`` (made by :func:`make_state` with this ``now``: its timestamp is
    ``iso(now)``) the run's current state and update the derived fields."""
    run["state"] = state
    run["state_id"] = state["id"]
    run["state_name"] = state["name"]
    state_type = run["state_type"] = state["type"]
    stamp = run["updated"] = state["timestamp"]  # iso(now)
    if state_type == "SCHEDULED":
        run["next_scheduled_start_time"] = state["state_details"]["scheduled_time"]
        run["expected_start_time"] = state["state_details"]["scheduled_time"]
    else:
        run["next_scheduled_start_time"] = None
    if state_type in TERMINAL:
        _ended(run, stamp, now)


def _ended(run: dict[str, Any], stamp: str, now: float) -> None:
    """A final state's fields of the run: its end time, and how long it ran."""
    run["end_time"] = stamp
    start = run.get("start_time")
    if start:
        try:
            run["total_run_time"] = round(max(0.0, now - epoch(start)), 6)
        except ValueError:  # pragma: no cover - we wrote it ourselves
            pass


def system_state(run: dict[str, Any], state_type: str, now: float, *, name: str | None = None,
                 message: str | None = None, scheduled_time: float | None = None,
                 deferred: bool = False) -> dict[str, Any]:
    """A state the server sets by itself (lease expiry): bypasses the table."""
    previous = (run.get("state") or {}).get("state_details") or {}
    details = {"deferred": deferred, "task_parameters_id": previous.get("task_parameters_id")}
    state = make_state(state_type, run["id"], now, name=name, message=message, details=details,
                       scheduled_time=scheduled_time)
    _apply(run, state, now)
    return state


# -- Prefect-compatible mode ----------------------------------------------------------------------
#
# ``Server(prefect_compatible=True)`` answers as a Prefect 3.8.8 server does (its
# ``prefect/server/orchestration/core_policy.py`` and ``global_policy.py``, read for this), so
# that a client's Prefect dialect meets Prefect's answers in the default test run. Prefect picks
# the policy from the PROPOSAL (``models/task_runs.set_task_run_state``):
#
# - ``state_details.deferred=true`` -> BackgroundTaskPolicy (even with ``force``);
# - else ``force=true`` -> MinimalTaskPolicy (accept anything);
# - else CoreTaskPolicy.
#
# The rules below are the ones of those policies that apply to a background run (cache,
# concurrency-slot and flow-run rules have nothing to act on here), in Prefect's order:
#
# ======================================  ===========================================================
# Rule (policy)                           Effect
# ======================================  ===========================================================
# PreventPendingTransitions (background)  PENDING, RUNNING, CANCELLING, CANCELLED -> PENDING: ABORT
#                                         "This run is in a X state and cannot transition to a
#                                         PENDING state." (PENDING -> PENDING under a new name other
#                                         than "Pending" passes)
# HandleTaskTerminalStateTransitions      terminal -> CANCELLING/PAUSED/CRASHED: ABORT "Run is
#                                         already X."; COMPLETED with persisted data -> anything:
#                                         REJECT "This run is already completed."; otherwise leaving
#                                         a terminal state is ACCEPTED (run_count reset to 0)
# CopyScheduledTime                       SCHEDULED -> PENDING keeps the scheduled time
# CopyTaskParametersID (background)       SCHEDULED/PENDING -> PENDING/RUNNING keeps the parameters id
# WaitForScheduledTime                    SCHEDULED/PENDING -> RUNNING before the scheduled time:
#                                         WAIT, delay_seconds rounded to whole seconds
# RetryFailedTasks                        RUNNING -> FAILED with retries left: REJECT with SCHEDULED
#                                         "AwaitingRetry" (deferred=false: NOT re-queued; a worker
#                                         re-proposes it with deferred=true to queue it)
# RenameReruns                            -> RUNNING when run_count > 0: "Retrying" from
#                                         AwaitingRetry, else "Rerunning"
# EnqueueScheduledTasks (background)      -> SCHEDULED with deferred=true: queued
# ======================================  ===========================================================
#
# Where this differs from the embedded server's own table (above): RUNNING -> RUNNING is
# accepted ("Rerunning", no ABORT), a non-deferred PENDING for a claimed run is accepted, a
# late PENDING/RUNNING for a FAILED (or data-less COMPLETED) run is accepted, AwaitingRetry
# is not re-queued by itself, and an early RUNNING is answered WAIT.

PREFECT_TERMINAL_ABORTS = frozenset({"CANCELLING", "PAUSED", "CRASHED"})
_PREVENT_PENDING_FROM = frozenset({"PENDING", "CANCELLING", "RUNNING", "CANCELLED"})


def _abort(current_state: dict[str, Any] | None, reason: str) -> Decision:
    return Decision(ABORT, current_state, {"type": "abort_details", "reason": reason}, changed=False)  # type: ignore[arg-type]


def _wait_seconds(scheduled: float, now: float) -> int:
    """Prefect's rounding: floor of the delay, plus its microseconds rounded (a timedelta)."""
    import datetime as _dt
    import math

    delay = _dt.timedelta(seconds=scheduled - now)
    return math.floor(delay.total_seconds()) + round(delay.microseconds / 1e6)


def orchestrate_prefect(run: dict[str, Any], proposed: dict[str, Any], force: bool, now: float) -> Decision:
    """Prefect 3.8.8's answer to a proposed state (see the table above); ``run`` is modified
    in place when the state changes, as :func:`orchestrate` does."""
    current_state = run.get("state")
    current = current_state["type"] if current_state else None
    current_details = (current_state or {}).get("state_details") or {}
    target = proposed["type"]
    details = dict(proposed["state_details"])
    deferred = bool(details.get("deferred"))
    name = proposed["name"]
    run_id = run["id"]
    run_count = run.get("run_count", 0)
    rules = current_state is not None and (deferred or not force)  # MinimalTaskPolicy: none

    if rules:
        if deferred and target == "PENDING" and current in _PREVENT_PENDING_FROM:
            if current == "PENDING" and current_state.get("name") != name and name not in (None, "Pending"):  # type: ignore[union-attr]
                details["scheduled_time"] = current_details.get("scheduled_time")
            else:
                return _abort(current_state, f"This run is in a {current} state and cannot transition to a "
                                             "PENDING state.")
        if current in TERMINAL:
            if target in PREFECT_TERMINAL_ABORTS:
                return _abort(current_state, f"Run is already {current}.")
            data = current_state.get("data")  # type: ignore[union-attr]
            if current == "COMPLETED" and data and not (isinstance(data, dict) and data.get("type") == "unpersisted"):
                return Decision(REJECT, current_state, {"type": "reject_details",  # type: ignore[arg-type]
                                                        "reason": "This run is already completed."}, changed=False)
            if target not in TERMINAL:
                run_count = 0
        if current == "SCHEDULED" and target == "PENDING" and not details.get("scheduled_time"):
            details["scheduled_time"] = current_details.get("scheduled_time")
        if (deferred and current in ("SCHEDULED", "PENDING") and target in ("PENDING", "RUNNING")
                and not details.get("task_parameters_id")):
            details["task_parameters_id"] = current_details.get("task_parameters_id")
        if current in ("SCHEDULED", "PENDING") and target == "RUNNING" and current_details.get("scheduled_time"):
            try:
                seconds = _wait_seconds(parse_time(current_details["scheduled_time"], []), now)
            except ValueError:  # pragma: no cover - we wrote it ourselves
                seconds = 0
            if seconds > 0:
                return Decision(WAIT, current_state, {"type": "wait_details", "delay_seconds": seconds,  # type: ignore[arg-type]
                                                      "reason": "Scheduled time is in the future"}, changed=False)
        if current == "RUNNING" and target == "FAILED":
            policy = run.get("empirical_policy") or {}
            retries = policy.get("retries")
            if details.get("retriable") is not False and retries is not None and run_count <= retries:
                due = now + retry_delay(policy, run_count)
                state = make_state("SCHEDULED", run_id, now, name="AwaitingRetry", message=proposed["message"],
                                   data=proposed["data"], scheduled_time=due)
                _apply(run, state, now)
                return Decision(REJECT, state, {"type": "reject_details", "reason": "Retrying"}, changed=True)
        if target == "RUNNING" and run_count > 0:
            name = "Retrying" if current_state.get("name") == "AwaitingRetry" else "Rerunning"  # type: ignore[union-attr]

    scheduled_time = None
    if target == "SCHEDULED":
        scheduled_time = proposed["scheduled_time"] if proposed["scheduled_time"] is not None else now
    if target == "RUNNING":
        run_count += 1
        if run.get("start_time") is None:
            run["start_time"] = iso(now)
    run["run_count"] = run_count
    state = make_state(target, run_id, now, name=name, message=proposed["message"], data=proposed["data"],
                       details=details, scheduled_time=scheduled_time)
    if current in TERMINAL and target not in TERMINAL:
        run["end_time"] = None  # SetEndTime: leaving a final state clears it
    _apply(run, state, now)
    queue = target == "SCHEDULED" and deferred  # EnqueueScheduledTasks
    return Decision(ACCEPT, state, ACCEPT_DETAILS, changed=True, queue=queue,
                    due=scheduled_time or now)
