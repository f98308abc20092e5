"""The objects of Prefect 3's task-run protocol, as plain dataclasses.

``from_json`` reads what a Prefect 3 server (or the embedded server) sends, ignoring
fields it does not know, so a newer server does not break an older client. ``to_json``
writes only what Prefect's API accepts. Ids are kept as strings: they are only ever
compared and sent back.
"""
from __future__ import annotations

import enum
import os
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Type, TypeVar, Union

from sync_worker.ids import uuid4_text


class StateType(str, enum.Enum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"


TERMINAL_STATES = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
)

_EnumT = TypeVar("_EnumT", bound=enum.Enum)


def _member_lookup(enum_class: Type[_EnumT]) -> Callable[[Any], _EnumT]:
    """``enum_class(value)`` at the cost of a dict lookup: the call goes through
    ``EnumType.__call__`` (~1 us, and every state read from the server needed two); an
    unknown or unhashable value still gets the enum's own ``ValueError``."""
    members: Dict[Any, _EnumT] = dict(enum_class._value2member_map_)  # type: ignore[arg-type]

    def member(value: Any) -> _EnumT:
        try:
            return members[value]
        except (KeyError, TypeError):  # the enum words the error
            return enum_class(value)

    return member


_state_type = _member_lookup(StateType)


class SetStateStatus(str, enum.Enum):
    """The server's answer to a proposed state."""

    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    ABORT = "ABORT"
    WAIT = "WAIT"


_status = _member_lookup(SetStateStatus)


def now() -> datetime:
    return datetime.now(timezone.utc)


#: Python 3.11's ``fromisoformat`` reads the ``Z`` suffix itself (one C call per timestamp:
#: every run read from a server carries four or five of them).
_FROMISOFORMAT_READS_Z = sys.version_info >= (3, 11)


def parse_datetime(value: Any) -> Optional[datetime]:
    """Parse an ISO 8601 timestamp as Prefect writes it (``...Z``) into an aware datetime."""
    if value is None or isinstance(value, datetime):
        return value
    text = str(value)
    if not _FROMISOFORMAT_READS_Z and text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def format_datetime(value: Optional[datetime]) -> Optional[str]:
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class StateDetails:
    deferred: Optional[bool] = None
    task_parameters_id: Optional[str] = None
    task_run_id: Optional[str] = None
    flow_run_id: Optional[str] = None
    scheduled_time: Optional[datetime] = None
    retriable: Optional[bool] = None
    cache_key: Optional[str] = None

    @classmethod
    def from_json(cls, data: Optional[Mapping[str, Any]]) -> "StateDetails":
        if not data:
            return cls()
        get = data.get
        return cls(  # every server's answer carries one
            get("deferred"),
            _opt_str(get("task_parameters_id")),
            _opt_str(get("task_run_id")),
            _opt_str(get("flow_run_id")),
            parse_datetime(get("scheduled_time")),
            get("retriable"),
            get("cache_key"),
        )

    def to_json(self) -> Dict[str, Any]:
        """Only the fields that are set: Prefect fills in its defaults for the rest."""
        out: Dict[str, Any] = {}
        for name in ("deferred", "task_parameters_id", "task_run_id", "flow_run_id", "retriable", "cache_key"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.scheduled_time is not None:
            out["scheduled_time"] = format_datetime(self.scheduled_time)
        return out


@dataclass
class State:
    type: StateType
    name: Optional[str] = None
    message: Optional[str] = None
    timestamp: Optional[datetime] = None
    id: Optional[str] = None
    state_details: StateDetails = field(default_factory=StateDetails)
    data: Any = None

    def __post_init__(self) -> None:
        if self.type.__class__ is not StateType:
            self.type = _state_type(self.type)
        if self.name is None:
            self.name = self.type.value.capitalize()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "State":
        get = data.get
        return cls(  # positional: the worker reads one per answer
            _state_type(data["type"]),
            get("name"),
            get("message"),
            parse_datetime(get("timestamp")),
            _opt_str(get("id")),
            StateDetails.from_json(get("state_details")),
            get("data"),
        )

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"type": self.type.value, "name": self.name}
        if self.message is not None:
            out["message"] = self.message
        if self.timestamp is not None:
            out["timestamp"] = format_datetime(self.timestamp)
        details = self.state_details.to_json()
        if details:
            out["state_details"] = details
        if self.data is not None:
            out["data"] = self.data
        return out

    def is_terminal(self) -> bool:
        return self.type in TERMINAL_STATES

    def is_scheduled(self) -> bool:
        return self.type is StateType.SCHEDULED

    def is_completed(self) -> bool:
        return self.type is StateType.COMPLETED

    def is_failed(self) -> bool:
        return self.type is StateType.FAILED

    # Prefect's State predicates, for code written against Prefect's futures
    def is_final(self) -> bool:
        return self.is_terminal()

    def is_pending(self) -> bool:
        return self.type is StateType.PENDING

    def is_running(self) -> bool:
        return self.type is StateType.RUNNING

    def is_cancelled(self) -> bool:
        return self.type is StateType.CANCELLED

    def is_cancelling(self) -> bool:
        return self.type is StateType.CANCELLING

    def is_crashed(self) -> bool:
        return self.type is StateType.CRASHED

    def is_paused(self) -> bool:
        return self.type is StateType.PAUSED

    def __str__(self) -> str:
        return f"{self.name}({self.type.value})" + (f": {self.message}" if self.message else "")


def Scheduled(*, deferred: bool = True, task_parameters_id: Optional[str] = None, scheduled_time: Optional[datetime] = None) -> State:
    """The state a background run is created in."""
    return State(
        StateType.SCHEDULED,
        "Scheduled",
        state_details=StateDetails(deferred=deferred, task_parameters_id=task_parameters_id, scheduled_time=scheduled_time),
    )


def scheduled_json(task_parameters_id: Optional[str] = None, scheduled_time: Optional[datetime] = None) -> Dict[str, Any]:
    """``Scheduled(task_parameters_id=..., scheduled_time=...).to_json()`` (the same dict, keys
    in the same order), built directly: ``.delay()`` needs only the JSON, and the objects
    cost ~3 us of each call."""
    details: Dict[str, Any] = {"deferred": True}
    if task_parameters_id is not None:
        details["task_parameters_id"] = task_parameters_id
    if scheduled_time is not None:
        details["scheduled_time"] = format_datetime(scheduled_time)
    return {"type": "SCHEDULED", "name": "Scheduled", "state_details": details}


def Pending(*, deferred: bool = True) -> State:
    return State(StateType.PENDING, "Pending", state_details=StateDetails(deferred=deferred))


def Running() -> State:
    return State(StateType.RUNNING, "Running")


def Completed(data: Any = None) -> State:
    return State(StateType.COMPLETED, "Completed", data=data)


def Failed(message: str, *, name: str = "Failed", data: Any = None, deferred: bool = True) -> State:
    """``deferred=True`` makes a Prefect server put the retry back on the task queue."""
    return State(StateType.FAILED, name, message=message, data=data, state_details=StateDetails(deferred=deferred))


@dataclass
class EmpiricalPolicy:
    retries: int = 0
    retry_delay: Union[float, List[float], None] = 0
    retry_jitter_factor: Optional[float] = None

    @classmethod
    def from_json(cls, data: Optional[Mapping[str, Any]]) -> "EmpiricalPolicy":
        if not data:
            return cls()
        return cls(
            retries=int(data.get("retries") or 0),
            retry_delay=data.get("retry_delay", 0),
            retry_jitter_factor=data.get("retry_jitter_factor"),
        )

    def to_json(self) -> Dict[str, Any]:
        return policy_json(self.retries, self.retry_delay, self.retry_jitter_factor)


def policy_json(retries: int, retry_delay: Union[float, List[float], None],
                retry_jitter_factor: Optional[float]) -> Dict[str, Any]:
    """``EmpiricalPolicy(...).to_json()`` without the object (``.delay()`` sends only this)."""
    out: Dict[str, Any] = {"retries": retries, "retry_delay": retry_delay}
    if retry_jitter_factor is not None:
        out["retry_jitter_factor"] = retry_jitter_factor
    return out


@dataclass
class TaskRun:
    id: str
    name: str
    task_key: str
    dynamic_key: str
    state: Optional[State] = None
    empirical_policy: EmpiricalPolicy = field(default_factory=EmpiricalPolicy)
    tags: List[str] = field(default_factory=list)
    labels: Dict[str, Any] = field(default_factory=dict)
    run_count: int = 0
    flow_run_id: Optional[str] = None
    task_inputs: Dict[str, Any] = field(default_factory=dict)
    created: Optional[datetime] = None
    expected_start_time: Optional[datetime] = None
    start_time: Optional[datetime] = None
    end_time: Optional[datetime] = None
    #: The parameters record delivered with the run (the embedded server's
    #: ``inline_parameters``), read instead of the store; not part of the run's JSON.
    parameters_record: Optional[str] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TaskRun":
        state = data.get("state")
        return cls(
            id=str(data["id"]),
            name=data.get("name") or "",
            task_key=data["task_key"],
            dynamic_key=data.get("dynamic_key") or "",
            state=State.from_json(state) if state else None,
            empirical_policy=EmpiricalPolicy.from_json(data.get("empirical_policy")),
            tags=list(data.get("tags") or []),
            labels=dict(data.get("labels") or {}),
            run_count=int(data.get("run_count") or 0),
            flow_run_id=_opt_str(data.get("flow_run_id")),
            task_inputs=dict(data.get("task_inputs") or {}),
            created=parse_datetime(data.get("created")),
            expected_start_time=parse_datetime(data.get("expected_start_time")),
            start_time=parse_datetime(data.get("start_time")),
            end_time=parse_datetime(data.get("end_time")),
            parameters_record=parameters_record_text(data),
        )

    def to_json(self) -> Dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "task_key": self.task_key,
            "dynamic_key": self.dynamic_key,
            "state": self._state_json(),
            "empirical_policy": self.empirical_policy.to_json(),
            "tags": list(self.tags),
            "labels": dict(self.labels),
            "run_count": self.run_count,
            "flow_run_id": self.flow_run_id,
            "task_inputs": dict(self.task_inputs),
            "created": format_datetime(self.created),
            "expected_start_time": format_datetime(self.expected_start_time),
            "start_time": format_datetime(self.start_time),
            "end_time": format_datetime(self.end_time),
        }


    def _state_json(self) -> Optional[Dict[str, Any]]:
        if self.state is None:
            return None
        out = self.state.to_json()
        if self.state.id is not None:  # proposals never carry an id (Prefect forbids it); runs do
            out["id"] = self.state.id
        return out


#: Label of runs whose creator reads inline results (sync_worker's own submitters). Runs
#: without it (created by Prefect's ``.delay()``) get result records a Prefect caller reads.
INLINE_RESULTS_LABEL = {"sync-worker.results": "inline"}


def new_run_id() -> str:
    """``str(uuid.uuid4())``, at a third of its cost: 16 random bytes from ``os.urandom``
    with the version (4) and variant bits set as ``uuid.UUID`` sets them, and the same text,
    without building a ``UUID`` (one per ``.delay()``). The bytes come from a block of
    ``os.urandom`` read 256 ids at a time (one system call each, not one per id); a forked
    child starts a block of its own, never its parent's rest."""
    global _random_block, _random_offset
    with _random_lock:
        offset = _random_offset
        if offset + 16 > len(_random_block):
            _random_block, offset = os.urandom(_RANDOM_BLOCK), 0
        _random_offset = offset + 16
        value = int.from_bytes(_random_block[offset:offset + 16], "big")
    return uuid4_text(value)


_RANDOM_BLOCK = 4096
_random_lock = threading.Lock()
_random_block = b""
_random_offset = 0


def _forget_random_block() -> None:
    """In a forked child: the parent's unused random bytes would give the same ids twice."""
    global _random_block, _random_offset, _random_lock
    _random_lock = threading.Lock()
    _random_block, _random_offset = b"", 0


os.register_at_fork(after_in_child=_forget_random_block)


def task_run_create(
    *,
    name: str,
    task_key: str,
    state: Union[State, Mapping[str, Any]],
    empirical_policy: Union[EmpiricalPolicy, Mapping[str, Any], None] = None,
    tags: Optional[List[str]] = None,
    task_inputs: Optional[Dict[str, Any]] = None,
    dynamic_key: Optional[str] = None,
    id: Optional[str] = None,
) -> Dict[str, Any]:
    """The body of ``POST /task_runs/`` in the shape Prefect's own client sends, with a
    client-chosen ``id`` (a new UUID unless given): a create repeated after a lost answer
    then names the same run, and both servers answer it instead of creating another. The
    ``dynamic_key`` (unique per run, as Prefect's client makes it) is derived from that id.

    The run carries :data:`INLINE_RESULTS_LABEL`: its creator (sync_worker's ``.delay()``,
    the Django backend) reads results carried inline in the final state, so a worker on
    the embedded server need not write a record file (see ``sync_worker.dialects``).

    ``state`` and ``empirical_policy`` may be given as their JSON already (``.delay()`` does:
    :func:`scheduled_json`, :func:`policy_json`)."""
    run_id = id or new_run_id()
    if empirical_policy is None:
        policy: Dict[str, Any] = {"retries": 0, "retry_delay": 0}
    elif isinstance(empirical_policy, EmpiricalPolicy):
        policy = empirical_policy.to_json()
    else:
        policy = dict(empirical_policy)
    return {
        "id": run_id,
        "name": name,
        "task_key": task_key,
        "dynamic_key": dynamic_key or f"{task_key}-{(new_run_id() if id else run_id).replace('-', '')}",
        "flow_run_id": None,
        "empirical_policy": policy,
        "tags": list(tags or []),
        "labels": dict(INLINE_RESULTS_LABEL),
        "task_inputs": {name: [] for name in (task_inputs or {})},
        "state": state.to_json() if isinstance(state, State) else dict(state),
    }


@dataclass
class OrchestrationResult:
    status: SetStateStatus
    state: Optional[State] = None
    details: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "OrchestrationResult":
        state = data.get("state")
        return cls(
            _status(data["status"]),
            State.from_json(state) if state else None,
            dict(data.get("details") or {}),
        )

    @property
    def reason(self) -> Optional[str]:
        return self.details.get("reason")

    @property
    def delay_seconds(self) -> float:
        """How long a WAIT asks the caller to wait before proposing again."""
        return float(self.details.get("delay_seconds") or 0)


def parameters_record_text(data: Mapping[str, Any]) -> Optional[str]:
    """The parameters record a delivered run's JSON carries (``inline_parameters``), if any."""
    value = data.get("parameters_record")
    return value if isinstance(value, str) else None


def _opt_str(value: Any) -> Optional[str]:
    """``None`` stays ``None``; anything else as text (a ``str`` as it is, without a call)."""
    return value if value is None or value.__class__ is str else str(value)
