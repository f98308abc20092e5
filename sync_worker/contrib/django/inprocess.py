"""The in-process worker: runs in the web process itself, for single-process deployments.

Opt in with ``SYNC_WORKER_IN_PROCESS = True`` (or a dict of :func:`start_in_process_worker`
keywords, e.g. ``{"limit": 4, "queues": ["default"]}``; the dict is checked when the app is
ready, and a mistake in it is an ``ImproperlyConfigured`` error naming the key).
``AppConfig.ready()`` runs in every process that sets Django up, and in most of them a
worker would be wrong. The rule, in this order:

1. A management command other than ``runserver`` (``migrate``, ``shell``, ``test``,
   ``sync_worker``...: the last one is the worker), however it is started (``manage.py``,
   ``django-admin``, ``python -m django``, any script calling
   ``execute_from_command_line``): no worker.
2. ``runserver``: with the autoreloader Django runs two processes; the parent only watches
   files and restarts the child, and the worker starts in the child (``RUN_MAIN=true``),
   again after each reload. ``runserver --noreload``: in its one process.
3. A test run: Django's test environment set up (``manage.py test``, a ``runtests.py``
   calling the test runner, pytest-django, also when it is set up after ``ready()``, as a
   ``LiveServerTestCase``'s server is), ``pytest``/``python -m pytest`` or ``python -m
   unittest``: no worker, and one INFO line says why.
4. Any other process: lazily, on the first request it serves through Django's
   ``WSGIHandler`` (or ``ASGIHandler``), i.e. a WSGI server: gunicorn, uwsgi, mod_wsgi,
   waitress, ... (``ready()`` may run in a ``--preload`` master before it forks, and a
   worker's threads do not survive ``fork()``). A request from Django's test ``Client``
   never starts it, whoever runs the tests, and a script that only calls
   ``django.setup()`` serves no request, so it gets none either.

Each serving process runs its own worker (4 gunicorn workers = 4 task workers, each with
``limit`` slots). A process that is killed takes its in-flight runs with it; the
embedded server delivers them again when the lease runs out. For anything bigger than
one process, run ``manage.py sync_worker`` as its own service instead.

Stopping: at exit (``atexit``) the worker stops taking runs and lets in-flight runs finish
(``SYNC_WORKER_DRAIN_TIMEOUT``). Under ``runserver --noreload`` SIGTERM is handled as
Ctrl-C (unless the project installed its own SIGTERM handler), so it drains too. Under the
autoreloader it cannot: on Ctrl-C or SIGTERM Django's parent process kills the serving
child (0.25 s after Ctrl-C, at once on SIGTERM), so the child logs one WARNING naming the
runs in flight (the server runs them again after their lease) and stops taking runs.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from typing import Any

logger = logging.getLogger("sync_worker.contrib.django")

_lock = threading.Lock()
_worker: Any = None
_worker_pid: int | None = None
_options: dict[str, Any] = {}

#: The keys SYNC_WORKER_IN_PROCESS may hold (the keywords of start_in_process_worker).
OPTION_KEYS = ("backend", "queues", "limit")


def _main_module_name() -> str | None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None)


def _command_argv() -> list[str] | None:
    """The argv of the management command this process runs (``argv[1]`` is the command;
    none: ``help``), or None: not a management command (a WSGI server, a test runner, a
    script).

    Read from Django's own ``ManagementUtility`` when it is on the call stack (``ready()``
    runs inside its ``execute()``), whatever started it; else from ``sys.argv``."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "execute":
            utility = frame.f_locals.get("self")
            if type(utility).__name__ == "ManagementUtility" and type(utility).__module__ == "django.core.management":
                return list(getattr(utility, "argv", None) or [])
        frame = frame.f_back
    argv = sys.argv
    if not argv:
        return None
    name = os.path.basename(argv[0])
    is_manage = name in ("manage.py", "django-admin", "django-admin.py")
    is_module = _main_module_name() == "django.__main__" or (
        name == "__main__.py" and os.path.basename(os.path.dirname(argv[0])) == "django")
    if is_manage or is_module:
        return list(argv)
    return None


def _no_reload(argv: list[str]) -> bool:
    """``runserver --noreload``, or an abbreviation argparse takes (``--norel``)."""
    return any(len(arg) >= 5 and "--noreload".startswith(arg) for arg in argv[2:])


def _test_run() -> str | None:
    """What says this process runs tests, or None: Django's test environment is set up
    (``setup_test_environment``: ``manage.py test``, a ``runtests.py`` calling the test
    runner, pytest-django; it gives ``django.core.mail`` its ``outbox``), or the process is
    pytest or ``python -m unittest``. Not "pytest is imported": project code may import it
    at run time (that disabled the worker under gunicorn, without a word)."""
    from django.core import mail

    if hasattr(mail, "outbox"):
        return "Django's test environment"
    if sys.argv and os.path.basename(sys.argv[0]) in ("pytest", "py.test"):
        return "pytest"
    if _main_module_name() in ("pytest", "pytest.__main__", "unittest.__main__"):
        return _main_module_name()
    return None


def validate_options(options: Any) -> dict[str, Any]:
    """SYNC_WORKER_IN_PROCESS as start_in_process_worker's keywords; ImproperlyConfigured
    naming the setting, the key and the value for anything that cannot be used."""
    from django.core.exceptions import ImproperlyConfigured

    def refuse(why: str) -> ImproperlyConfigured:
        return ImproperlyConfigured(f"SYNC_WORKER_IN_PROCESS: {why}")

    if options is True:
        return {}
    if not isinstance(options, dict):
        raise refuse(f"{options!r} is neither True nor a dict of options ({', '.join(OPTION_KEYS)})")
    unknown = sorted(map(repr, set(options) - set(OPTION_KEYS)))
    if unknown:
        raise refuse(f"unknown key(s) {', '.join(unknown)}; accepted keys: {', '.join(OPTION_KEYS)}")
    backend_alias = options.get("backend", "default")
    if not isinstance(backend_alias, str):
        raise refuse(f"'backend' is {backend_alias!r}: it must be an alias of TASKS (a str)")
    limit = options.get("limit", 4)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise refuse(f"'limit' is {limit!r}: it must be a whole number >= 1, or None for no limit")
    queues = options.get("queues")
    if queues is not None and (isinstance(queues, str) or not isinstance(queues, (list, tuple)) or not queues
                               or not all(isinstance(q, str) for q in queues)):
        raise refuse(f"'queues' is {queues!r}: it must be a non-empty list of queue names (or left out: "
                     "every queue in QUEUES)")
    from sync_worker.contrib.django.backend import SyncWorkerBackend
    from sync_worker.contrib.django.compat import task_backends

    try:
        backend = task_backends[backend_alias]
    except ImproperlyConfigured as exc:
        raise refuse(f"'backend' is {backend_alias!r}: {exc}") from None
    if not isinstance(backend, SyncWorkerBackend):
        raise refuse(f"'backend' is {backend_alias!r}, whose TASKS BACKEND is {type(backend).__module__}."
                     f"{type(backend).__qualname__}, not sync_worker.contrib.django.SyncWorkerBackend")
    if queues is not None:
        missing = [q for q in queues if backend.queues and q not in backend.queues]
        if missing:
            raise refuse(f"'queues' names {', '.join(map(repr, missing))}, not in TASKS[{backend_alias!r}]"
                         f"['QUEUES'] ({', '.join(sorted(backend.queues))})")
    return dict(options)


def install(options: Any) -> None:
    """Called from ``AppConfig.ready()``: check the options, then decide (by the rule in
    this module's docstring) whether this process gets a worker, and when."""
    global _options
    _options = validate_options(options)
    argv = _command_argv()
    command = None if argv is None else (argv[1] if len(argv) > 1 else "help")
    if command is not None and command != "runserver":
        return
    if command == "runserver":
        if _no_reload(argv or []):
            _sigterm_as_ctrl_c()
        elif os.environ.get("RUN_MAIN") != "true":
            return  # the autoreloader's parent: it serves nothing
        else:
            from django.utils.autoreload import autoreload_started

            # sent in the serving child's main thread once Django installed its own SIGTERM handler
            autoreload_started.connect(_warn_on_stop_under_autoreloader, dispatch_uid="sync_worker_in_process")
        start_in_process_worker(**_options)
        return
    test_run = _test_run()
    if test_run:
        logger.info("In-process task worker not started: this process runs tests (%s)", test_run)
        return
    from django.core.signals import request_started

    request_started.connect(_start_on_request, dispatch_uid="sync_worker_in_process")


def _served_request(sender: Any) -> bool:
    """Whether ``request_started`` came from a server's handler (not the test Client's)."""
    from django.core.handlers.asgi import ASGIHandler
    from django.core.handlers.wsgi import WSGIHandler

    return isinstance(sender, type) and issubclass(sender, (WSGIHandler, ASGIHandler))


def _start_on_request(sender: Any = None, **_kwargs: Any) -> None:
    if (_worker is None or _worker_pid != os.getpid()) and _served_request(sender):
        if _test_run():  # set up after ready(): a LiveServerTestCase's server, say
            return
        start_in_process_worker(**_options)


def start_in_process_worker(backend: str = "default", queues: list[str] | None = None,
                            limit: int | None = 4) -> Any:
    """Start (once per process) a non-blocking worker for the project's tasks; returns it."""
    global _worker, _worker_pid
    with _lock:
        if _worker is not None and _worker_pid == os.getpid() and _worker.started:
            return _worker
        from sync_worker.contrib.django.worker import build_worker

        worker = build_worker(backend, queues, limit)
        worker.start(block=False)
        _worker, _worker_pid = worker, os.getpid()
        atexit.register(_stop, worker)
        logger.info("In-process task worker started in process %s", _worker_pid)
        return worker


def _stop(worker: Any) -> None:
    """At exit: stop taking runs and let in-flight runs finish (the drain timeout). A second
    Ctrl-C or SIGTERM meanwhile is a cold stop that names the runs it abandons (it was a
    traceback from the atexit hook and the runs left unnamed)."""
    try:
        if worker.started:
            worker.stop()
        worker.join(worker.settings.drain_timeout)
    except KeyboardInterrupt:
        worker._cold_stop()


# -- signals under runserver ---------------------------------------------------------------
def _sigterm_as_ctrl_c() -> None:
    """``runserver --noreload``: SIGTERM as Ctrl-C (runserver then exits 0 and the atexit
    drain runs), unless a SIGTERM handler is installed already (the project's: kept)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    logger.info("SIGTERM received: stopping as on Ctrl-C (the in-process worker lets its in-flight runs finish)")
    raise KeyboardInterrupt


def _warn_on_stop_under_autoreloader(**_kwargs: Any) -> None:
    """In the autoreloader's serving child (main thread): wrap the SIGINT and SIGTERM
    handlers so that the first one logs what the parent's kill will abandon."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN or getattr(previous, "_sync_worker_wrapped", False):
            continue
        signal.signal(signum, _wrapped_handler(signum, previous))


_warned = False


def _wrapped_handler(signum: int, previous: Any) -> Any:
    def handler(sig: int, frame: Any) -> None:
        _abandon_warning(sig)
        if callable(previous):
            previous(sig, frame)
        elif previous is signal.SIG_IGN:  # pragma: no cover - not wrapped
            return
        else:  # SIG_DFL (or None: a handler not set from Python): what the signal does by default
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    handler._sync_worker_wrapped = True  # type: ignore[attr-defined]
    return handler


def _abandon_warning(signum: int) -> None:
    """Once: the runs in flight will not finish here; stop taking runs (the runs delivered
    but not started go back to the server when the worker stops receiving)."""
    global _warned
    worker = _worker
    if _warned or worker is None or _worker_pid != os.getpid():
        return
    _warned = True
    running: list[str] = []
    for _attempt in range(3):  # without the worker's lock (never taken in a handler): a copy may see a change
        try:
            running = [run_id for runs in list(worker.in_flight_task_runs.values()) for run_id in list(runs)]
            break
        except RuntimeError:
            continue
    name = signal.Signals(signum).name
    if running:
        logger.warning(
            "%s received: Django's autoreloader kills this runserver process (0.25 s after Ctrl-C, at once on "
            "SIGTERM), so the in-process worker cannot let its %d run(s) in flight finish: %s; the server runs them "
            "again once their lease expires. For tasks that must finish, use `runserver --noreload` (SIGTERM and "
            "Ctrl-C then drain) or run `manage.py sync_worker` as its own process.",
            name, len(running), ", ".join(running))
    try:
        if worker.started:
            worker.stop()  # stop taking runs: hand back those delivered but not started
    except Exception:  # noqa: BLE001 - never in the way of the signal's own handling
        logger.debug("Could not stop the in-process worker on %s", name, exc_info=True)
