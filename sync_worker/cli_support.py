"""What every ``sync-worker`` subcommand shares: option types whose errors name the option,
one-line errors instead of tracebacks for user mistakes, and logging (text or JSON).

Exit codes of the command: 0 done, 1 a failure at run time (refused credentials, a worker
that failed), 2 a user mistake (a bad option, a bad ``SYNC_WORKER_*`` value, a port in use,
a database another server holds), 130 interrupted. A user mistake is always one line on
stderr, ``<prog>: error: <what>``, naming the option or setting to change.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


#: the namespace attribute naming the innermost (sub)command that parsed the arguments
#: (``sync-worker runs ls``): the program name of its error lines
COMMAND_PROG = "command_prog"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``prog: error: argument --port: ...`` (no usage
    block, which for the server is ten lines that push the reason off the screen).

    Subcommand parsers made by :meth:`add_subparsers` are of this class too. Each one sets
    its own ``prog`` as the default of :data:`COMMAND_PROG`, and a subcommand's defaults
    override its parent's, so after parsing ``args.command_prog`` names the command the user
    ran (``sync-worker runs ls``, not ``sync-worker runs``). Unrecognized arguments are
    reported by that command, not by the top-level parser, with the option meant when a
    known one is close (``--limt``: did you mean ``--limit``?).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(**{COMMAND_PROG: self.prog})

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._command_parser(getattr(namespace, COMMAND_PROG, None))
            command.error(unrecognized_message(command, extras))
        return namespace

    def _command_parser(self, prog: str | None) -> argparse.ArgumentParser:
        """This parser or the (nested) subcommand parser whose ``prog`` is ``prog``."""
        pending: list[argparse.ArgumentParser] = [self]
        while pending:
            parser = pending.pop()
            if parser.prog == prog:
                return parser
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    pending.extend(action.choices.values())
        return self


def unrecognized_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """``unrecognized arguments: --limt 3; did you mean --limit?``: the hint names the known
    option of ``parser`` closest to the first unknown one, when one is close enough."""
    import difflib

    message = f"unrecognized arguments: {' '.join(extras)}"
    # compared without the leading "--", which would make every option look alike ("--bogus", "--runs")
    known = [option[2:] for action in parser._actions for option in action.option_strings if option.startswith("--")]
    for extra in extras:
        if not extra.startswith("--") or extra == "--":
            continue
        close = difflib.get_close_matches(extra[2:].split("=", 1)[0], known, n=1)
        if close:
            return f"{message}; did you mean --{close[0]}?"
    return message


# -- option types: argparse prints "argument --opt: <message>" -----------------------------
def positive_int(text: str) -> int:
    """A count >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= 1")
    return value


def positive_float(text: str) -> float:
    """Seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number > 0")
    return value


def port(text: str) -> int:
    """A TCP port, 0-65535 (0 = any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0-65535 (0 = any free port)")
    return value


def api_url(text: str) -> str:
    """``--api-url``: an http(s) URL, as ``SYNC_WORKER_API_URL`` must be."""
    from sync_worker.settings import api_url_problem

    problem = api_url_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text


def worker_limit(text: str) -> int | None:
    """``--limit``: a whole number >= 1, or ``none`` for no limit.

    ``0`` is refused rather than read as "no limit": it reads just as well as "take
    nothing", and ``TaskWorker(limit=0)`` refuses it too.
    """
    if text.strip().lower() in ("none", "unlimited"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (or 'none' for no limit)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1 (use --limit none for no limit)")
    return value


# -- logging -------------------------------------------------------------------------------
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, ``process``, ``thread``, ``exc_info`` when there is one, and any
    ``extra={...}`` fields. For log shippers that want JSON; use it from ``logging``
    configuration as ``{"()": "sync_worker.cli_support.JsonFormatter"}``."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            document["exc_info"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in document:
                document[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        return json.dumps(document, ensure_ascii=False)


def add_logging_options(parser: argparse.ArgumentParser, default_level: str = "INFO") -> None:
    """``--log-level`` and ``--log-format`` (both with help text)."""
    parser.add_argument("--log-level", default=default_level, choices=LOG_LEVELS, type=str.upper,
                        help=f"least severe log messages shown on stderr (default {default_level})")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text (default) or json: one JSON object per line, for log collectors")


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Send log records to stderr in ``log_format``; leaves handlers a host already set up
    (pytest, an application's own ``logging`` configuration) in place."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("sync_worker").setLevel(level)


# -- running a subcommand ------------------------------------------------------------------
def run_command(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace, prog: str) -> int:
    """Run a subcommand; a user mistake becomes one line on stderr and exit code 2.

    :class:`~sync_worker.exceptions.ConfigurationError` (which includes bad
    ``SYNC_WORKER_*`` values and ports that cannot be used) is a user mistake; other
    sync_worker errors (refused credentials, a failed worker) are one line and exit 1.
    Anything else is a bug and keeps its traceback.
    """
    from sync_worker.exceptions import ConfigurationError, SyncWorkerError

    try:
        code = int(func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is handled, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sync-worker runs ls | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the exit's own flush must not fail again
        os.close(devnull)
        return 141  # as a command ended by SIGPIPE (128 + 13)
    except ConfigurationError as exc:
        print_error(prog, exc)
        return 2
    except SyncWorkerError as exc:
        print_error(prog, exc)
        return 1


def one_line(exc: object) -> str:
    """An error's text as one line, without a remote traceback (what follows a blank line)."""
    return " ".join(str(exc).split("\n\n", 1)[0].split())


def print_error(prog: str, exc: object) -> None:
    """``prog: error: <exc>`` on stderr, in one line (a JSON record with ``--log-format json``)."""
    text = one_line(exc)
    if _json_logging():
        # --log-format json: a log collector parses every stderr line, so the last one is a record too
        logging.getLogger("sync_worker.cli").error("%s: error: %s", prog, text)
        return
    sys.stderr.write(f"{prog}: error: {text}\n")
    sys.stderr.flush()


def _json_logging() -> bool:
    """Whether configure_logging set up JSON records on the root logger."""
    return any(isinstance(handler.formatter, JsonFormatter) for handler in logging.getLogger().handlers)


#: modules of the ``[server]`` extra that the embedded server (and so the demo) imports
SERVER_EXTRA_MODULES = ("werkzeug", "simple_websocket")


def require_server_extra(command: str) -> None:
    """Raise a one-line ConfigurationError when the ``[server]`` extra is not installed,
    instead of letting the server's first import end in a traceback."""
    import importlib

    from sync_worker.exceptions import ConfigurationError

    for module in SERVER_EXTRA_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigurationError(
                f"{command} needs the [server] extra ({module} is not installed): "
                f"pip install 'sync_worker[server]'") from None


@contextmanager
def removed_on_failure(paths: Sequence[str]) -> Iterator[None]:
    """Delete those of ``paths`` (files or empty directories) that did not exist on entry
    if the block raises: a server that failed to start leaves no database files behind
    that it created itself, and never touches files that were there before."""
    existed = {path for path in paths if os.path.lexists(path)}
    try:
        yield
    except BaseException:
        for path in reversed(paths):  # a directory after the files in it: list parents first
            if path in existed:
                continue
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)  # only if empty
                elif os.path.lexists(path):
                    os.remove(path)
            except OSError:
                pass
        raise
