"""No-op task definitions for the peer systems benchmarked by ``benchmarks/peers.py``.

Imported both by the peer worker processes (``dramatiq peer_tasks``, ``celery -A peer_tasks``,
``rq worker`` resolving ``peer_tasks.noop``) and by the enqueuing side, always inside the peers
venv, never by sync_worker itself.  Which library is used is chosen by the environment so that
one module serves all three systems and only the chosen library gets imported:

- ``PEERS_SYSTEM``: ``dramatiq`` | ``celery`` | ``rq``
- ``PEERS_REDIS_URL``: the private benchmark Redis (``redis://127.0.0.1:<port>/0``)
- ``PEERS_DONE_KEY``: Redis list the task pushes to when it has run

The task body is the same for every system: it does nothing except signal completion with ONE
``RPUSH done-key "<pid>:<unix time>"`` (an O(1) Redis command on an already-open pooled connection), so the
benchmark can (a) count finished jobs with ``LLEN`` and (b) wait for a single job with ``BLPOP``
without polling, (c) take the last job's own finish time as the end of the e2e run, and (d) learn
which process actually ran the task (to read its RSS).  It returns
None.  That RPUSH is the only work, and it is identical across systems.
"""

from __future__ import annotations

import os
import threading
import time

SYSTEM = os.environ.get("PEERS_SYSTEM", "")
REDIS_URL = os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6379/0")
DONE_KEY = os.environ.get("PEERS_DONE_KEY", "peers:done")
QUEUE = "peers"

_client = None
_client_pid = 0
_lock = threading.Lock()


def _redis():
    """One pooled, thread-safe client per process (re-created after a fork, e.g. RQ's work horse)."""
    global _client, _client_pid
    pid = os.getpid()
    if _client is None or _client_pid != pid:
        with _lock:
            if _client is None or _client_pid != pid:
                import redis

                _client = redis.Redis.from_url(REDIS_URL)
                _client_pid = pid
    return _client


def _signal_done() -> None:
    _redis().rpush(DONE_KEY, f"{os.getpid()}:{time.time():.6f}")


if SYSTEM == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=REDIS_URL)
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name=QUEUE, max_retries=0)
    def noop() -> None:
        """The benchmark job: signal completion, return None."""
        _signal_done()

elif SYSTEM == "celery":
    from celery import Celery

    app = Celery("peer_tasks", broker=REDIS_URL)
    # Defaults otherwise: no result backend, worker_prefetch_multiplier=4, acks on receipt.
    app.conf.update(
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
    )

    @app.task(name="peer_tasks.noop")
    def noop() -> None:
        """The benchmark job: signal completion, return None."""
        _signal_done()

else:  # rq (and plain import): RQ resolves jobs by dotted path, a plain function is all it needs.

    def noop() -> None:
        """The benchmark job: signal completion, return None."""
        _signal_done()
