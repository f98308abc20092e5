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
                        (run_count <= retries, not             (message kept, scheduled_time = now +
                        retriable=false)                       retry_delay[attempt] with jitter); the run
                                                               goes back on the queue when due
anything else           anything                               ACCEPT
======================  =====================================  ==========================================

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

from .models import STATE_TYPES, TERMINAL, iso, make_state

ANY: frozenset[str | None] = frozenset(STATE_TYPES) | {None}

ACCEPT = "ACCEPT"
REJECT = "REJECT"
ABORT = "ABORT"
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


def match(current: str | None, proposed: str) -> Rule:
    for rule in RULES:
        if current in rule.from_states and proposed in rule.to_states:
            return rule
    raise AssertionError("the last rule matches everything")  # pragma: no cover


@dataclass
class Decision:
    """The orchestration result, and what the server must do with the run."""

    status: str  # ACCEPT | REJECT | ABORT
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
                background: bool) -> Decision:
    """Apply the table to ``run`` (a stored TaskRun dict, modified in place when the state
    changes). ``proposed`` comes from :func:`models.validate_state`; ``background`` says the
    run was created deferred (it goes back on the queue when rescheduled)."""
    current_state = run.get("state")
    current = current_state["type"] if current_state else None
    target = proposed["type"]
    rule = match(current, target) if not force else RULES[-1]
    action = rule.action
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
        run_count = run.get("run_count", 0)
        if details.get("retriable") is not False and retries is not None and run_count <= retries:
            due = now + retry_delay(policy, run_count)
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
        run["run_count"] = run.get("run_count", 0) + 1
        if run["run_count"] > 1 and (name is None or name == "Running"):
            name = "Retrying"
        if run.get("start_time") is None:
            run["start_time"] = iso(now)
    state = make_state(target, run_id, now, name=name, message=proposed["message"], data=proposed["data"],
                       details=details, scheduled_time=scheduled_time)
    _apply(run, state, now)
    queue = target == "SCHEDULED" and (background or bool(details.get("deferred")))
    return Decision(ACCEPT, state, {"type": "accept_details"}, changed=True, queue=queue,
                    due=scheduled_time or now)


def _apply(run: dict[str, Any], state: dict[str, Any], now: float) -> None:
    """Make ``state`` the run's current state and update the derived fields."""
    run["state"] = state
    run["state_id"] = state["id"]
    run["state_name"] = state["name"]
    run["state_type"] = state["type"]
    run["updated"] = iso(now)
    if state["type"] == "SCHEDULED":
        run["next_scheduled_start_time"] = state["state_details"]["scheduled_time"]
        run["expected_start_time"] = state["state_details"]["scheduled_time"]
    else:
        run["next_scheduled_start_time"] = None
    if state["type"] in TERMINAL:
        run["end_time"] = iso(now)
        start = run.get("start_time")
        if start:
            from .models import parse_time

            try:
                run["total_run_time"] = round(max(0.0, now - parse_time(start, [])), 6)
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
