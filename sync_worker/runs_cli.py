"""``sync-worker runs ...`` and ``sync-worker status``: see what is queued or failing, act on it.

Tables for people, ``--json`` for scripts. Every command talks to the API at
``SYNC_WORKER_API_URL`` (or ``--api-url``) with the usual credentials. ``runs ls``, ``runs
show``, ``runs retry`` and ``runs cancel`` also work against a Prefect server (listing uses
Prefect's own ``/task_runs/filter``; ``--task`` is an embedded-server extension there);
``status`` and ``runs purge`` need the embedded server.

Exit codes: 0 done, 1 an error (a message on stderr says which), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from sync_worker.exceptions import SyncWorkerError

STATE_TYPES = ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED", "PAUSED",
               "CANCELLING"]
FINISHED_STATE_TYPES = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]
#: parameters shown by ``runs show`` up to this many characters of JSON
SHOW_PARAMETERS_LIMIT = 2000
#: the states in which a run is over (``runs retry`` copies only those)
FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")

LS_EXAMPLES = """examples:
  sync-worker runs ls                          the 20 newest runs
  sync-worker runs ls --state FAILED --since 1h
  sync-worker runs ls --task myapp.tasks.send_email --state SCHEDULED --limit 100
  sync-worker runs ls --json | jq -r '.[].id'
"""
RUNS_EXAMPLES = """examples:
  sync-worker runs ls --state FAILED --since 1h    what failed in the last hour
  sync-worker runs show 1b4e28ba-2fa1-11d2-883f-0016d3cca427
  sync-worker runs retry 1b4e28ba-2fa1-11d2-883f-0016d3cca427
  sync-worker runs cancel ID1 ID2
  sync-worker runs purge --older-than 7d --state COMPLETED
  sync-worker status                              queues and workers at a glance
"""


def _duration(text: str) -> float:
    from sync_worker.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str) -> float:
    """``--since``: ``-5m`` reads as "5 minutes ago" too (the sign says which way)."""
    stripped = text.strip()
    return _duration(stripped[1:] if stripped.startswith("-") else stripped)


def _state(text: str) -> str:
    value = text.upper()
    if value not in STATE_TYPES:
        raise argparse.ArgumentTypeError(f"unknown state {text!r}: choose from {', '.join(STATE_TYPES)}")
    return value


def _finished_state(text: str) -> str:
    value = _state(text)
    if value not in FINISHED_STATE_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finished state: purge deletes runs in "
                                         f"{', '.join(FINISHED_STATE_TYPES)}")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 200:
        raise argparse.ArgumentTypeError("must be 1-200 (the API's page size)")
    return value


class CommandError(SyncWorkerError):
    """A failure to report in one line on stderr (exit code 1), by the CLI's one error handler
    (:func:`sync_worker.cli_support.run_command`)."""


# -- output helpers ----------------------------------------------------------------------------
#: Characters that a terminal obeys instead of showing: C0/C1 controls (ESC starts the sequences
#: that clear the screen, set the window title or hide text) and the bidirectional overrides.
#: Run data (task keys, messages, tracebacks) comes from whoever submitted or ran the task.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROLS_AND_LINES = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str, *, lines: bool = False) -> str:
    """``text`` with control characters written as escapes (``\x1b``, ``\n``): safe to print
    to an operator's terminal. ``lines``: newlines and tabs are kept."""
    pattern = _CONTROLS if lines else _CONTROLS_AND_LINES
    return pattern.sub(lambda m: repr(m.group())[1:-1], text)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    rows = [[_printable(cell) for cell in row] for row in rows]
    widths = [max([len(headers[i])] + [len(row[i]) for row in rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(cells[i].ljust(widths[i]) for i in range(len(widths))).rstrip()

    return "\n".join([line(headers)] + [line(row) for row in rows])


def _short_time(text: str | None) -> str:
    if not text:
        return "-"
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: Any) -> str:
    return "-" if not value else f"{float(value):.3f}s"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# -- commands ----------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Any:
    from sync_worker.client import Client

    return Client(api_url=args.api_url, retry_attempts=2)


def cmd_ls(args: argparse.Namespace) -> int:
    task_runs: dict[str, Any] = {}
    if args.state:
        task_runs["state"] = {"type": {"any_": args.state}}
    if args.task:
        task_runs["task_key"] = {"any_": args.task}
    if args.since is not None:
        after = datetime.now(timezone.utc) - timedelta(seconds=args.since)
        task_runs["expected_start_time"] = {"after_": after.isoformat()}
    body = {"sort": "EXPECTED_START_TIME_DESC", "limit": args.limit, "task_runs": task_runs}
    with _client(args) as client:
        runs = client.filter_task_runs(body)
    if args.json:
        _print_json(runs)
        return 0
    if not runs:
        print("no task runs match")
        return 0
    rows = [[r["id"], r.get("task_key") or "", (r.get("state") or {}).get("name") or r.get("state_name") or "",
             _short_time(r.get("expected_start_time")), _seconds(r.get("total_run_time")),
             str(r.get("run_count", 0))] for r in runs]
    print(_table(rows, ["ID", "TASK KEY", "STATE", "EXPECTED START (UTC)", "RUN TIME", "RUNS"]))
    return 0


def _parameters(client: Any, run: dict[str, Any]) -> tuple[Any, str | None]:
    """(parameters, None) or (None, why they are not shown)."""
    from sync_worker.settings import get_settings
    from sync_worker.storage import PARAMETERS_PREFIX, get_store, load_record

    params_id = ((run.get("state") or {}).get("state_details") or {}).get("task_parameters_id")
    if not params_id:
        return {}, None
    store = get_store(get_settings(), client)
    try:
        raw = store.read(PARAMETERS_PREFIX + params_id)
    except Exception as exc:  # deleted (completed runs), another machine's directory, ...
        return None, f"not available ({exc})"
    try:
        payload = load_record(raw)  # never unpickles
    except Exception as exc:
        return None, f"not shown ({exc})"
    parameters = payload.get("parameters") if isinstance(payload, dict) else payload
    text = json.dumps(parameters)
    if len(text) > SHOW_PARAMETERS_LIMIT:
        return None, f"not shown ({len(text)} characters of JSON; more than {SHOW_PARAMETERS_LIMIT})"
    return parameters, None


def _outcome(client: Any, run: dict[str, Any]) -> dict[str, Any]:
    from sync_worker.schemas import TaskRun
    from sync_worker.settings import get_settings
    from sync_worker.storage import get_store
    from sync_worker.tasks import TaskRunFuture

    state = run.get("state") or {}
    if state.get("type") not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        return {}
    future = TaskRunFuture(run["id"], client=client, store=get_store(get_settings(), client),
                           task_run=TaskRun.from_json(run))
    try:
        value = future.result(timeout=0, raise_on_failure=False)
    except Exception as exc:
        return {"result_error": str(exc)}
    if state.get("type") == "COMPLETED":
        return {"result": value}
    return {"error_type": getattr(value, "exception_type", None), "traceback": getattr(value, "traceback", None)}


def _parse_time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def _history(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The states of a run with the seconds spent in each (until the next state; ``None`` for
    the current one)."""
    history = []
    for i, state in enumerate(states):
        start = _parse_time(state.get("timestamp"))
        end = _parse_time(states[i + 1].get("timestamp")) if i + 1 < len(states) else None
        duration = (end - start).total_seconds() if start and end else None
        history.append({"id": state.get("id"), "type": state.get("type"), "name": state.get("name"),
                        "timestamp": state.get("timestamp"), "message": state.get("message"),
                        "duration_seconds": duration})
    return history


def _history_table(history: list[dict[str, Any]]) -> str:
    rows = []
    for entry in history:
        stamp = _parse_time(entry["timestamp"])
        when = stamp.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if stamp else "-"
        duration = "-" if entry["duration_seconds"] is None else f"{entry['duration_seconds']:.3f}s"
        rows.append([when, f"{entry['name']} ({entry['type']})", duration, (entry.get("message") or "")[:60]])
    return _table(rows, ["TIME (UTC)", "STATE", "DURATION", "MESSAGE"])


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client._retried(lambda: client.request("GET", f"/task_runs/{args.id}"))
        run = response.json()
        history = _history(client.read_task_run_states(run["id"]))
        parameters, why = _parameters(client, run)
        outcome = _outcome(client, run)
    state = run.get("state") or {}
    if args.json:
        _print_json({"task_run": run, "states": history, "parameters": parameters, "parameters_note": why,
                     **outcome})
        return 0
    details = state.get("state_details") or {}
    lines = [
        f"id:              {run['id']}",
        f"task key:        {run.get('task_key')}",
        f"name:            {run.get('name')}",
        f"state:           {state.get('name')} ({state.get('type')}) since {_short_time(state.get('timestamp'))}",
    ]
    if state.get("message"):
        lines.append(f"message:         {state['message']}")
    lines += [
        f"created:         {_short_time(run.get('created'))}",
        f"expected start:  {_short_time(run.get('expected_start_time'))}",
    ]
    if details.get("scheduled_time") and state.get("type") == "SCHEDULED":
        lines.append(f"scheduled for:   {_short_time(details['scheduled_time'])}")
    lines += [
        f"started:         {_short_time(run.get('start_time'))}",
        f"ended:           {_short_time(run.get('end_time'))}",
        f"run time:        {_seconds(run.get('total_run_time'))}",
        f"attempts:        {run.get('run_count', 0)} (retries allowed: "
        f"{(run.get('empirical_policy') or {}).get('retries') or 0})",
        f"tags:            {', '.join(run.get('tags') or []) or '-'}",
        f"parameters:      {json.dumps(parameters) if why is None else why}",
    ]
    if history:
        lines.append("states:")
        lines += ["  " + line for line in _history_table(history).splitlines()]
    if "result" in outcome:
        lines.append(f"result:          {json.dumps(outcome['result'], default=repr)}")
    if outcome.get("traceback"):
        lines.append("traceback:")
        lines += ["  " + line for line in outcome["traceback"].rstrip().splitlines()]
    elif outcome.get("result_error"):
        lines.append(f"result:          not available ({outcome['result_error']})")
    print(_printable("\n".join(lines), lines=True))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """A new run of the same task with the same parameters (the old run is left as it is)."""
    from sync_worker.schemas import Scheduled, TaskRun
    from sync_worker.settings import get_settings
    from sync_worker.storage import PARAMETERS_PREFIX, get_store

    with _client(args) as client:
        old = client.read_task_run(args.id)
        state_type = old.state.type.value if old.state else None
        if state_type not in FINISHED_STATES:  # it may still run: a copy would run the task twice
            raise CommandError(f"cannot retry {args.id}: it is {state_type or 'without a state'}; only a finished "
                               f"run ({', '.join(FINISHED_STATES)}) can be retried (cancel it first: "
                               f"sync-worker runs cancel {args.id})")
        raw = client._retried(lambda: client.request("GET", f"/task_runs/{args.id}")).json()
        params_id = old.state.state_details.task_parameters_id if old.state else None
        new_params_id = None
        if params_id:
            store = get_store(get_settings(), client)
            try:
                record = store.read(PARAMETERS_PREFIX + params_id)
            except Exception as exc:
                raise CommandError(f"cannot retry {args.id}: its parameters are gone ({exc}); a run that "
                                   "COMPLETED has its parameters deleted") from None
            new_params_id = str(uuid.uuid4())
            record_json = json.loads(record)
            if isinstance(record_json.get("metadata"), dict):
                record_json["metadata"]["storage_key"] = new_params_id
            store.write(PARAMETERS_PREFIX + new_params_id, json.dumps(record_json).encode())
        body = {
            "name": raw.get("name") or old.task_key,
            "task_key": old.task_key,
            "dynamic_key": str(uuid.uuid4()),
            "state": Scheduled(task_parameters_id=new_params_id).to_json(),
            "empirical_policy": raw.get("empirical_policy") or {},
            "tags": raw.get("tags") or [],
            "labels": raw.get("labels") or {},
            "task_inputs": raw.get("task_inputs") or {},
        }
        new: TaskRun = client.create_task_run(body)
    if args.json:
        _print_json({"retried": args.id, "task_run_id": new.id})
    else:
        print(_printable(f"{args.id} -> new run {new.id} ({old.task_key})"))
    return 0


def _cancelling_how(notified: bool, held_by: str | None) -> str:
    if notified:
        return "its worker was told to stop it"
    if held_by == "connection":  # a Prefect worker: it takes no cancel message
        return "its worker cannot be told to stop it (not a sync_worker worker); the run ends as that worker reports"
    return "its worker's connection is gone; it ends CANCELLED when its lease runs out"


def cmd_cancel(args: argparse.Namespace) -> int:
    results = []
    failed = False
    with _client(args) as client:
        for run_id in args.ids:
            try:
                answer = client.cancel_task_run(run_id)
            except Exception as exc:
                failed = True
                results.append({"id": run_id, "status": "error", "error": str(exc)})
                continue
            state = answer["task_run"].get("state") or {}
            results.append({"id": run_id, "status": answer["status"], "state": state.get("type"),
                            "worker_notified": answer.get("notified", False), "held_by": answer.get("held_by")})
    if args.json:
        _print_json(results)
    else:
        from sync_worker.cli_support import COMMAND_PROG, print_error

        prog = getattr(args, COMMAND_PROG, None) or "sync-worker runs cancel"
        for item in results:
            if item["status"] == "error":  # one error line per run, as every other command's
                print_error(prog, f"{item['id']}: {item['error']}")
            elif item["status"] == "unchanged":
                print(f"{item['id']}: not cancelled, it is already {item['state']}")
            elif item["status"] == "cancelling":
                how = _cancelling_how(item["worker_notified"], item["held_by"])
                print(f"{item['id']}: CANCELLING ({how})")
            else:
                print(f"{item['id']}: CANCELLED")
    return 1 if failed else 0


def cmd_purge(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if not args.yes and sys.stdin.isatty():  # a person at a terminal: a slip in the duration must not wipe runs
            states = ", ".join(args.state or FINISHED_STATES)
            answer = input(f"Delete every {states} run that ended more than {args.older_than:g} s ago, with its "
                           f"records, from {client.api_url}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        deleted = client.purge_task_runs(args.older_than, args.state or [])
    if args.json:
        _print_json({"deleted": deleted})
    else:
        print(f"deleted {deleted} finished run(s)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.read_stats()
    if args.json:
        _print_json(stats)
        return 0
    keys = stats["task_keys"]
    if keys:
        rows = []
        for item in keys:
            counts = item["counts"]
            age = item.get("oldest_scheduled_age_seconds")
            rows.append([item["task_key"], str(counts.get("SCHEDULED", 0)),
                         str(counts.get("PENDING", 0) + counts.get("RUNNING", 0) + counts.get("CANCELLING", 0)),
                         str(counts.get("COMPLETED", 0)), str(counts.get("FAILED", 0) + counts.get("CRASHED", 0)),
                         str(counts.get("CANCELLED", 0)), "-" if age is None else f"{age:.0f}s",
                         str(len(item["workers"]))])
        print(_table(rows, ["TASK KEY", "SCHEDULED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED",
                            "OLDEST WAITING", "WORKERS"]))
    else:
        print("no task runs")
    print()
    workers = stats["workers"]
    if workers:
        rows = [[w["client_id"] or "?", w["host"] or "?", "-" if w["limit"] is None else str(w["limit"]),
                 str(w["in_flight"]), ", ".join(w["task_keys"])] for w in workers]
        print(_table(rows, ["WORKER", "ADDRESS", "LIMIT", "IN FLIGHT", "TASK KEYS"]))
    else:
        print("no workers subscribed")
    return 0


# -- parsers -----------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser, json_help: str = "print JSON instead of a table") -> None:
    parser.add_argument("--json", action="store_true", help=json_help)
    from sync_worker.cli_support import api_url

    parser.add_argument("--api-url", type=api_url, default=None, metavar="URL",
                        help="the API (default: SYNC_WORKER_API_URL / PREFECT_API_URL)")


def add_runs_parser(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser(
        "runs", help="list, inspect, retry, cancel and purge task runs",
        description="List, inspect, retry, cancel and purge task runs.", epilog=RUNS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = runs.add_subparsers(title="commands", metavar="COMMAND", help="what to do (each has its own --help)")
    runs.set_defaults(func=lambda args: (runs.print_help(), 2)[1])

    ls = sub.add_parser("ls", help="list runs, newest first", epilog=LS_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("--state", type=_state, action="append", metavar="STATE",
                    help=f"only runs in this state type (repeatable): {', '.join(STATE_TYPES)}")
    ls.add_argument("--task", action="append", metavar="KEY", help="only runs of this task key (repeatable)")
    ls.add_argument("--since", type=_since, metavar="DURATION",
                    help="only runs expected to start within this long ago, e.g. 90s, 15m, 1h, 7d (-15m alike)")
    ls.add_argument("--limit", type=_limit, default=20, help="most runs to list (1-200, default 20)")
    _common(ls)
    ls.set_defaults(func=_wrap(cmd_ls), log_level="ERROR")

    show = sub.add_parser("show", help="one run: states, times, parameters, result or traceback",
                          epilog="example:\n  sync-worker runs show 1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("id", help="the task run id (as printed by runs ls)")
    _common(show, "print JSON instead of text")
    show.set_defaults(func=_wrap(cmd_show), log_level="ERROR")

    retry = sub.add_parser("retry", help="submit a new run with the same task and parameters",
                           epilog="example:\n  sync-worker runs retry 1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    retry.add_argument("id", help="the id of the run to submit again")
    _common(retry, "print JSON")
    retry.set_defaults(func=_wrap(cmd_retry), log_level="ERROR")

    cancel = sub.add_parser(
        "cancel", help="cancel runs: waiting ones are never delivered, running ones are interrupted",
        epilog="example:\n  sync-worker runs cancel ID1 ID2\n  sync-worker runs ls --state SCHEDULED --task "
               "myapp.tasks.report --json | jq -r '.[].id' | xargs -r sync-worker runs cancel",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cancel.add_argument("ids", nargs="+", metavar="ID", help="one or more task run ids")
    _common(cancel, "print JSON")
    cancel.set_defaults(func=_wrap(cmd_cancel), log_level="ERROR")

    purge = sub.add_parser(
        "purge", help="delete finished runs older than a duration (embedded server)",
        epilog="examples:\n  sync-worker runs purge --older-than 7d\n"
               "  sync-worker runs purge --older-than 1h --state COMPLETED --state CANCELLED",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    purge.add_argument("--older-than", type=_duration, required=True, metavar="DURATION",
                       help="runs that ended longer ago than this, e.g. 12h, 7d")
    purge.add_argument("--state", type=_finished_state, action="append", metavar="STATE",
                       help="only runs in this finished state (repeatable; default all finished states)")
    purge.add_argument("-y", "--yes", action="store_true",
                       help="do not ask for confirmation (asked only when stdin is a terminal)")
    _common(purge, "print JSON")
    purge.set_defaults(func=_wrap(cmd_purge), log_level="ERROR")


def add_status_parser(subparsers: argparse._SubParsersAction) -> None:
    status = subparsers.add_parser(
        "status", help="queues and workers at a glance (embedded server)",
        description="Per task key: runs by state and the age of the oldest waiting run; the subscribed "
                    "workers with their limit and runs in flight.",
        epilog="examples:\n  sync-worker status\n  watch -n 2 sync-worker status\n  sync-worker status --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(status)
    status.set_defaults(func=_wrap(cmd_status), log_level="ERROR")


def _is_record_file(path: Any) -> bool:
    """Whether a directory entry (``os.DirEntry``) is a record file that sync_worker or Prefect wrote: a
    regular file (not a symlink), named as a record key, whose text begins as a record does
    (``{"metadata": ... "serializer" ...``), or a temp file a writer that died left behind.
    Prune deletes nothing else, so a mistaken ``--dir`` (a home, ``/etc``) loses nothing."""
    from sync_worker.storage import is_record_key

    if not path.is_file(follow_symlinks=False):
        return False
    if path.name.startswith(".tmp-"):
        return True
    if not is_record_key(path.name):
        return False
    try:
        with open(path.path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and b'"metadata"' in head and b'"serializer"' in head


def cmd_storage_prune(args: argparse.Namespace) -> int:
    """Delete record files older than ``--older-than`` from a local store directory: its
    records and its ``parameters/`` records, nothing below them and nothing that is not a
    record (see :func:`_is_record_file`)."""
    import os
    import time
    from pathlib import Path

    from sync_worker.settings import get_settings
    from sync_worker.storage import PARAMETERS_PREFIX

    from sync_worker.exceptions import ConfigurationError

    # a setting or --dir that names no local store is a usage mistake: exit code 2, like every other
    settings = get_settings()
    directory = Path(args.dir or settings.storage).expanduser()
    if not args.dir and settings.uses_server_storage:
        raise ConfigurationError("SYNC_WORKER_STORAGE=server: the embedded server deletes its records itself "
                                 "(--retention); pass --dir for a local directory")
    if not directory.is_dir():
        where = "--dir" if args.dir else "SYNC_WORKER_STORAGE"
        raise ConfigurationError(f"{directory} ({where}) is not a directory")
    cutoff = time.time() - args.older_than
    deleted = kept = size = others = 0
    places = [(directory, False), (directory / PARAMETERS_PREFIX.rstrip("/"), True)]
    for place, parameters in places:
        if parameters and not args.include_parameters:
            continue
        try:
            entries = list(os.scandir(place))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and not parameters and entry.name == PARAMETERS_PREFIX.rstrip("/"):
                continue
            try:
                if not _is_record_file(entry):
                    others += 1
                    continue
                stat = entry.stat(follow_symlinks=False)
                if stat.st_mtime >= cutoff:
                    kept += 1
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            deleted += 1
            size += stat.st_size
    if args.json:
        _print_json({"deleted": deleted, "bytes": size, "kept": kept, "not_records": others,
                     "directory": str(directory)})
    else:
        print(f"deleted {deleted} record file(s) ({size} bytes) older than {args.older_than:g}s from {directory}; "
              f"kept {kept}" + (f"; left alone {others} entries that are not record files" if others else ""))
    if deleted == 0 and kept == 0 and others:
        print(f"warning: {directory} holds no record files ({others} other entries, left alone): "
              f"is it the store directory?", file=sys.stderr)
    return 0


def add_storage_parser(subparsers: argparse._SubParsersAction) -> None:
    storage = subparsers.add_parser(
        "storage", help="manage a local record store directory",
        description="Manage a local record store directory (SYNC_WORKER_STORAGE).")
    sub = storage.add_subparsers(title="commands", metavar="COMMAND", help="what to do (each has its own --help)")
    storage.set_defaults(func=lambda args: (storage.print_help(), 2)[1])
    prune = sub.add_parser(
        "prune", help="delete result records older than a duration",
        description="Delete result (and failure) record files older than --older-than from a local store "
                    "directory that no server manages. Only record files are deleted (files named as records "
                    "whose text is a record, in the directory and its parameters/ folder; no other file, "
                    "folder or symlink). Parameter files are kept unless --include-parameters: "
                    "a run still waiting (a delayed one, or one whose key no worker serves yet) needs its "
                    "parameters; those of COMPLETED runs are deleted by the worker already.",
        epilog="examples:\n  sync-worker storage prune --older-than 7d\n"
               "  sync-worker storage prune --older-than 30d --dir /var/lib/myapp/results --include-parameters",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("--older-than", type=_duration, required=True, metavar="DURATION",
                       help="files last written longer ago than this, e.g. 12h, 7d")
    prune.add_argument("--dir", default=None, help="the directory (default: SYNC_WORKER_STORAGE)")
    prune.add_argument("--include-parameters", action="store_true",
                       help="also delete parameter files older than the duration")
    prune.add_argument("--json", action="store_true", help="print JSON")
    prune.set_defaults(func=_wrap(cmd_storage_prune), log_level="ERROR")


def _wrap(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    return lambda args: _api_errors(func, args)


def _api_errors(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The API's failures as :class:`CommandError` (printed as one line, exit code 1)."""
    import requests

    from sync_worker.exceptions import ServerUnavailable

    try:
        return func(args)
    except requests.HTTPError as exc:
        raise CommandError(str(exc)) from None
    except (requests.RequestException, ServerUnavailable) as exc:
        # refused, timed out, an answer broken off in transit: what went wrong, in one line
        raise CommandError(f"cannot reach the API ({exc.__class__.__name__}); is the server running and "
                           "answering? (SYNC_WORKER_API_URL / --api-url)") from None
