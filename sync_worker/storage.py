"""Parameter and result records, and the stores that hold them.

A background run does not carry its parameters: the submitter writes them to a store as
a *record* and puts the record's key in the run's ``task_parameters_id``; the worker
reads them back. Results travel the same way, the COMPLETED state's ``data`` naming the
record. The record layout is Prefect 3's ``ResultRecord`` so that records written by
Prefect can be read here and the other way round::

    {"metadata": {"storage_key": "<key>", "expiration": null,
                  "serializer": {"type": "json", ...}, "prefect_version": "...",
                  "storage_block_id": null},
     "result": "<the serializer's output, as text>"}

Serializers: ``json`` (default) and ``pickle`` (base64-wrapped, as Prefect writes it).
Reading a pickle record executes code chosen by whoever wrote it, so it is refused
unless ``SYNC_WORKER_ALLOW_PICKLE=true``.

Stores: a local directory (default, ``SYNC_WORKER_STORAGE``), or the embedded server's
``/api/storage`` endpoint (``SYNC_WORKER_STORAGE=server``) for workers and submitters on
different machines with no shared disk.
"""
from __future__ import annotations

import base64
import functools
import importlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
import traceback
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sync_worker import exceptions
from sync_worker.exceptions import ParameterReadError, SerializationError, SyncWorkerError
from sync_worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from sync_worker.client import Client

#: Written into records' metadata; Prefect requires the field, its value is informational.
RECORD_VERSION = "3.8.8"

SERIALIZERS = ("json", "pickle")

logger = logging.getLogger("sync_worker.storage")

_KEY = re.compile(r"^(parameters/)?[A-Za-z0-9._-]{1,200}$")

#: Parameter records live in a ``parameters/`` namespace, as Prefect lays them out
#: (``<storage>/parameters/<task_parameters_id>``), so both can share one directory.
PARAMETERS_PREFIX = "parameters/"
#: the object decoder Prefect's JSON records name (see :mod:`sync_worker.prefect_json`)
PREFECT_DECODER = "prefect.serializers.prefect_json_object_decoder"

#: Prefect's JSON serializer, without its object encoder and decoder: our records hold JSON's
#: types only, and Prefect's decoder would turn a dict with a "__class__" key into an object of
#: a class it imports (see :mod:`sync_worker.prefect_json`).
_JSON_SERIALIZER = {
    "type": "json",
    "jsonlib": "json",
    "object_encoder": None,
    "object_decoder": None,
    "dumps_kwargs": {},
    "loads_kwargs": {},
}
_PICKLE_SERIALIZER = {"type": "pickle", "picklelib": "pickle", "picklelib_version": None}

PICKLE_OPT_IN = (
    "reading it would unpickle data from the queue, which can execute arbitrary code; "
    "set SYNC_WORKER_ALLOW_PICKLE=true in the process that reads it (the worker for parameters, the caller "
    "for a result) if you trust whoever wrote it"
)


class RecordNotFound(SyncWorkerError, KeyError):
    """No record is stored under this key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "record not found"


class RecordStore(Protocol):
    """Where records live. Keys are ``[A-Za-z0-9._-]`` names, optionally ``parameters/<name>``."""

    def write(self, key: str, data: bytes) -> None: ...

    def read(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...


def is_record_key(name: str) -> bool:
    """Whether ``name`` can be a record's key (a file name in a store directory)."""
    return _KEY.match(name) is not None


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"invalid record key {key!r}: use 1-200 characters from A-Z a-z 0-9 . _ - "
                         f"(optionally after {PARAMETERS_PREFIX!r})")
    return key


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class LocalDirectoryStore:
    """Records as files in one directory; writes are atomic (temp file + rename)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()

    def location(self, key: str) -> Path:
        """The file of a record: Prefect callers are given this absolute path as storage key."""
        return self.path / check_key(key)

    def write(self, key: str, data: bytes) -> None:
        """Atomic: written to ``.tmp-<pid>-<thread>-<name>`` beside the record (unique to this
        writer, so no random name is needed on every ``.delay()``), then renamed over it."""
        target = os.path.join(self.path, check_key(key))
        directory, name = os.path.split(target)
        try:
            fd, tmp = _open_temp(directory, name)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = _open_temp(directory, name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def read(self, key: str) -> bytes:
        try:
            return self.location(key).read_bytes()
        except FileNotFoundError:
            raise RecordNotFound(f"no record {key!r} in {self.path}") from None

    def delete(self, key: str) -> None:
        try:
            self.location(key).unlink()
        except FileNotFoundError:
            pass

    def __repr__(self) -> str:
        return f"LocalDirectoryStore({str(self.path)!r})"


def _open_temp(directory: str, name: str) -> tuple[int, str]:
    """A new temp file for ``name`` in ``directory`` (mode 0600, as ``mkstemp`` makes it)."""
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{threading.get_ident()}-{name}")
    try:
        return os.open(tmp, _TEMP_FLAGS, 0o600), tmp
    except FileExistsError:  # left by a writer that died with this pid and thread id
        return tempfile.mkstemp(dir=directory, prefix=".tmp-")


class ServerStore:
    """Records kept by the embedded server (``/api/storage/{key}``)."""

    def __init__(self, client: Client):
        self.client = client

    @staticmethod
    def remote_key(key: str) -> str:
        """The key under ``/api/storage/``: one path segment."""
        return check_key(key).replace("/", ".")

    def write(self, key: str, data: bytes) -> None:
        self.client.write_record(self.remote_key(key), data)

    def read(self, key: str) -> bytes:
        try:
            return self.client.read_record(self.remote_key(key))
        except exceptions.ObjectNotFound:
            raise RecordNotFound(f"no record {key!r} on {self.client.api_url}") from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_record(self.remote_key(key))
        except exceptions.ObjectNotFound:
            pass

    def __repr__(self) -> str:
        return f"ServerStore({self.client.api_url!r})"


def get_store(settings: Settings | None = None, client: Client | None = None) -> RecordStore:
    """The store named by ``SYNC_WORKER_STORAGE``: a directory, or ``server``.

    Called on every ``.delay()``: a directory's store is made once per path and shared (it
    holds nothing but its path)."""
    settings = settings or get_settings()
    if settings.uses_server_storage:
        if client is None:
            from sync_worker.client import get_client

            client = get_client(settings)
        return ServerStore(client)
    return _local_store(settings.storage)


@functools.lru_cache(maxsize=32)
def _local_store(path: str) -> LocalDirectoryStore:
    return LocalDirectoryStore(path)


#: Largest serialized result carried inside its state (see :func:`inline_result`).
INLINE_RESULT_LIMIT = 16 * 1024
#: Largest parameters record carried inside a create and a delivered run when the embedded
#: server keeps the records (``SYNC_WORKER_STORAGE=server``): a larger one is written and
#: read with requests of its own, so that no websocket message grows without bound.
INLINE_PARAMETERS_LIMIT = 64 * 1024


# -- records -----------------------------------------------------------------------------
def dump_record(value: Any, serializer: str = "json", key: str | None = None) -> bytes:
    """Serialize ``value`` into a Prefect-layout record; raises SerializationError."""
    return json.dumps(make_record(value, serializer, key)).encode()


def make_record(value: Any, serializer: str = "json", key: str | None = None) -> dict[str, Any]:
    """The record of ``value`` as a dict (see :func:`dump_record`)."""
    if serializer == "json":
        try:
            # ``json.dumps(None, allow_nan=False)`` builds an encoder per call (~4 us); a task
            # that returns nothing is the common case, and its text is known
            payload = "null" if value is None else json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise SerializationError(
                f"cannot serialize {_describe(value)} with the json serializer: {exc}. "
                "Pass JSON-compatible values (str, int, float, bool, None, list, dict with "
                "str keys), or opt in to pickle with result_serializer='pickle'"
            ) from exc
        serializer_meta: dict[str, Any] = {**_JSON_SERIALIZER, "dumps_kwargs": {}, "loads_kwargs": {}}
        if isinstance(value, dict) and "__exc_type__" in value:  # a failure (describe_exception):
            serializer_meta["object_decoder"] = PREFECT_DECODER  # a Prefect caller rebuilds the exception
    elif serializer == "pickle":
        import pickle

        try:
            payload = base64.encodebytes(pickle.dumps(value)).decode()
        except Exception as exc:
            raise SerializationError(f"cannot pickle {_describe(value)}: {exc}") from exc
        serializer_meta = dict(_PICKLE_SERIALIZER)
    else:
        raise ValueError(f"unknown serializer {serializer!r}; choose one of {', '.join(SERIALIZERS)}")
    metadata = {
        "storage_key": key,
        "expiration": None,
        "serializer": serializer_meta,
        "prefect_version": RECORD_VERSION,
        "storage_block_id": None,
    }
    return {"metadata": metadata, "result": payload}


def load_record(data: bytes | dict[str, Any], *, allow_pickle: bool = False) -> Any:
    """Read a record written by :func:`dump_record` or by Prefect (bytes, or parsed)."""
    try:
        record = json.loads(data) if isinstance(data, (bytes, str)) else data
        serializer = record["metadata"]["serializer"]
        kind = serializer["type"]
        payload = record["result"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SerializationError(f"not a valid record: {exc!r}") from exc
    if kind == "json":
        if serializer.get("jsonlib", "json") != "json":
            raise SerializationError(f"unsupported json library {serializer.get('jsonlib')!r} in record")
        if serializer.get("object_decoder") == PREFECT_DECODER:  # written by Prefect: its envelopes
            from sync_worker.prefect_json import object_hook

            text = payload if isinstance(payload, str) else json.dumps(payload)
            return json.loads(text, object_hook=object_hook)
        return json.loads(payload) if isinstance(payload, str) else payload
    if kind == "pickle":
        if not allow_pickle:
            raise SerializationError(f"the record is pickled; {PICKLE_OPT_IN}")
        picklelib = serializer.get("picklelib") or "pickle"
        try:
            pickler = importlib.import_module(picklelib)
        except ImportError:
            # cloudpickle output is readable by the standard library for importable objects
            import pickle as pickler
        return pickler.loads(base64.decodebytes(payload.encode()))
    raise SerializationError(f"unsupported serializer {kind!r} in record")


def write_parameters(store: RecordStore, parameters: dict[str, Any], serializer: str = "json") -> str:
    """Store a run's parameters (Prefect's payload shape) and return the record key."""
    key, record = parameters_record(parameters, serializer)
    store.write(PARAMETERS_PREFIX + key, record)
    return key


def parameters_record(parameters: dict[str, Any], serializer: str = "json") -> tuple[str, bytes]:
    """A new key (the run's ``task_parameters_id``) and the record of ``parameters``, not
    stored yet: :func:`write_parameters` stores it, or the create carries it
    (:meth:`sync_worker.client.Client.create_task_run`)."""
    key = str(uuid.uuid4())
    return key, dump_record({"parameters": parameters, "context": {}}, serializer, key)


def stage_parameters(store: RecordStore, client: Client, parameters: dict[str, Any],
                     serializer: str = "json") -> tuple[str, bytes | None]:
    """The key of a new run's parameters record, and the record when its create is to carry
    it (else ``None``: it is stored already).

    A record for the embedded server's store, submitted through the same client, goes with
    the create (``create_task_run(parameters_record=...)``): inside its message when it is
    no larger than :data:`INLINE_PARAMETERS_LIMIT` (no request of its own), else written by
    each attempt of the create just before it, so that a server that is down is retried
    for ``SYNC_WORKER_SUBMIT_TIMEOUT`` and reported as ``ServerUnavailable`` whatever the
    record's size. Any other record is written to ``store`` here, before the create."""
    key, record = parameters_record(parameters, serializer)
    if isinstance(store, ServerStore) and store.client is client:
        return key, record
    store.write(PARAMETERS_PREFIX + key, record)
    return key, None


def delete_parameters(store: RecordStore, key: str) -> None:
    store.delete(PARAMETERS_PREFIX + key)


def discard_parameters_of_refused_create(store: RecordStore, key: str, error: BaseException) -> None:
    """After a create failed with ``error``: delete the run's parameters record only if the
    server refused the create (a 4xx: certainly not created). After connection errors, 5xx
    (``ServerUnavailable``) or an interruption the run may exist: its record stays, so that
    it never becomes a run without parameters (an orphan record costs less than a lost call)."""
    if not isinstance(error, exceptions.APIError) or error.status_code >= 500:
        return
    try:
        delete_parameters(store, key)
    except Exception as exc:  # noqa: BLE001 - the create's error is the one the caller sees
        logger.warning("Could not delete parameters %s after a refused create: %s", key, exc)


def read_parameters(store: RecordStore, key: str, *, allow_pickle: bool = False,
                    record: str | None = None) -> dict[str, Any]:
    """The payload dict ``{"parameters": {...}, ...}``; ParameterReadError says what went wrong.

    ``key`` is the run's ``task_parameters_id``; ``record``: the record's text when it came
    with the run (the embedded server's ``inline_parameters``), so the store is not asked."""
    try:
        payload = load_record(store.read(PARAMETERS_PREFIX + key) if record is None else record,
                              allow_pickle=allow_pickle)
    except RecordNotFound as exc:
        raise ParameterReadError(f"parameters {key!r} not found: {exc}. Do the submitter and the worker share "
                                 "the same SYNC_WORKER_STORAGE?") from exc
    except SerializationError as exc:
        raise ParameterReadError(f"cannot read parameters {key!r}: {exc}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("parameters", {}), dict):
        raise ParameterReadError(f"parameters {key!r} are not a mapping of argument names to values")
    payload.setdefault("parameters", {})
    return payload


def write_result(store: RecordStore, value: Any, serializer: str = "json", key: str | None = None) -> dict[str, Any]:
    """Persist a result; returns the COMPLETED state's ``data`` (the record metadata).

    ``None`` is written like any value: a Prefect caller treats a COMPLETED state without
    data as a missing result. In a local directory the storage key is the record's
    absolute path, which is where a Prefect caller looks for it.
    """
    key = key or str(uuid.uuid4())
    storage_key = str(store.location(key)) if isinstance(store, LocalDirectoryStore) else key
    record = make_record(value, serializer, storage_key)
    store.write(key, json.dumps(record).encode())
    return record["metadata"]


def inline_result(value: Any, serializer: str = "json") -> dict[str, Any] | None:
    """State ``data`` that carries a small result itself: the whole record, no file.

    For the embedded server only (a Prefect caller expects record metadata naming a
    file): a result travels with its state, so a worker writes no file per run and a
    waiting caller reads none. ``None`` when the result is larger than
    :data:`INLINE_RESULT_LIMIT` (then use :func:`write_result`).
    """
    record = make_record(value, serializer)
    return record if len(record["result"]) <= INLINE_RESULT_LIMIT else None


def write_exception(store: RecordStore, exc: BaseException) -> dict[str, Any]:
    """Persist a failure as a JSON record: type, message and the formatted traceback."""
    return write_result(store, describe_exception(exc))  # type: ignore[return-value]


def sendable_text(text: str) -> str:
    """``text`` as valid UTF-8: lone surrogates (``os.fsdecode`` of a file name that is not
    UTF-8 makes them) become ``\\udcff`` escapes. JSON encoders refuse them, and the server
    refuses the state that carries them, which left a failed run RUNNING."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def exception_text(exc: BaseException) -> str:
    """``str(exc)``, sendable (:func:`sendable_text`), even when the exception's ``__str__``
    raises (the run must still end FAILED, saying so)."""
    try:
        text = str(exc)
    except Exception as err:  # noqa: BLE001 - any error of user code
        text = f"<str() of the {type(exc).__name__} raised {type(err).__name__}>"
    return sendable_text(text)


def describe_exception(exc: BaseException) -> dict[str, str]:
    """``type``/``message``/``traceback`` for sync_worker; ``__exc_type__`` lets Prefect's
    JSON decoder rebuild the exception for a Prefect caller (builtin types only: it refuses
    to import anything else, so other exceptions are described as ``Exception``)."""
    cls = type(exc)
    builtin = cls.__module__ == "builtins" and isinstance(getattr(__import__("builtins"), cls.__name__, None), type)
    return {
        "__exc_type__": f"builtins.{cls.__name__}" if builtin else "builtins.Exception",
        "type": cls.__qualname__,
        "message": exception_text(exc),
        "traceback": sendable_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))),
    }


def read_result(store: RecordStore, data: Any, *, allow_pickle: bool = False) -> Any:
    """The value behind a terminal state's ``data``.

    ``data`` is record metadata naming a key in ``store`` or (as Prefect writes it) an
    absolute path to the record file, or a whole record carried inline; ``None`` (an old
    sync_worker state) means ``None``.
    """
    if data is None:
        return None
    if isinstance(data, dict) and "result" in data and "metadata" in data:
        return load_record(data, allow_pickle=allow_pickle)  # carried inline (inline_result)
    if not isinstance(data, dict) or not data.get("storage_key"):
        raise SerializationError(f"the state's data does not name a stored result: {data!r}")
    key = data["storage_key"]
    if isinstance(key, str) and os.path.isabs(key):
        raw = _read_confined(store, key)
    else:
        raw = store.read(key)
    return load_record(raw, allow_pickle=allow_pickle)


#: largest result record read from a path (a state names the path: it must not make a caller
#: read /dev/zero or a huge file)
MAX_RECORD_SIZE = 256 * 1024 * 1024


def _read_confined(store: RecordStore, key: str) -> bytes:
    """A record at an absolute path (how Prefect names results), read only when it is a
    regular file inside the configured local store: whoever set the state chose the path."""
    root = getattr(store, "path", None)
    path = Path(key).resolve()
    if root is None or not path.is_relative_to(Path(root).expanduser().resolve()):
        raise SerializationError(f"result record path {key} is outside the configured store {store!r}; "
                                 "not read (set SYNC_WORKER_STORAGE to the directory results are written to)")
    try:
        info = path.stat()
    except FileNotFoundError:
        raise RecordNotFound(f"no result record at {key}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SerializationError(f"result record path {key} is not a regular file; not read")
    if info.st_size > MAX_RECORD_SIZE:
        raise SerializationError(f"result record {key} is {info.st_size} bytes, over the "
                                 f"{MAX_RECORD_SIZE} byte limit; not read")
    return path.read_bytes()


def _describe(value: Any) -> str:
    if isinstance(value, dict) and set(value) >= {"parameters"}:
        bad = [name for name, v in value["parameters"].items() if not _json_ok(v)]
        if bad:
            return "parameter(s) " + ", ".join(
                f"{name!r} ({type(value['parameters'][name]).__name__})" for name in bad
            )
    return f"a value of type {type(value).__name__}"


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True
