"""How a message travels: REST, or one of the embedded server's sockets.

One object per worker (:class:`Transport`) answers "how do I send this state proposal":
over the subscription socket when the connection that is open now announced the
``set_state`` extension in its ``auth_success`` (learned once per connection by
:mod:`sync_worker.subscription`) and ``SYNC_WORKER_FAST_PATH`` allows it, otherwise over
REST. Creates and waits choose the same way between the rpc socket and REST inside
:class:`~sync_worker.client.Client` (learned once, when the rpc socket first opens).

One error mapping for every path (:func:`error_for`): an answer with an error status,
whether it came as an HTTP response, an rpc reply or a ``set_state_result`` frame,
raises the same exception (:class:`~sync_worker.exceptions.Unauthorized` for 401/403,
:class:`~sync_worker.exceptions.ObjectNotFound` for 404,
:class:`~sync_worker.exceptions.APIError` otherwise, with ``status_code`` and ``detail``).
A socket that breaks before the answer is not an error of the request: the attempt is
made again over REST at once (the server orchestrates both identically, and a repeat of a
proposal that did land is recognised by the engine).

The one retry rule: the transport never retries. Each call here is **one attempt**; the
caller that knows what a repeat means owns the only retry loop:

- state proposals: the engine (:meth:`sync_worker.engine.TaskRunEngine._send`) repeats an
  attempt that failed intermittently (connection lost, timeout, 5xx) with exponential
  backoff and jitter for as long as the worker keeps its lease (``keep_trying``);
- creates: :meth:`Client.create_task_run` for ``SYNC_WORKER_SUBMIT_TIMEOUT`` seconds;
- reads, deletes and record writes: the client's bounded retry of idempotent calls.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

from sync_worker.exceptions import APIError, ObjectNotFound, Unauthorized

if TYPE_CHECKING:
    import requests

    from sync_worker.client import Client
    from sync_worker.schemas import OrchestrationResult, State

logger = logging.getLogger("sync_worker.transport")

CREDENTIALS_HINT = (
    " — check SYNC_WORKER_API_AUTH_STRING / PREFECT_API_AUTH_STRING (or the API key) "
    "against the server's auth string"
)


def error_for(what: str, status: int, detail: Any, response: Optional[requests.Response] = None) -> APIError:
    """The exception for an error answer, whichever way it travelled (the one mapping)."""
    message = f"{what} failed with {status}: {detail}"
    if status in (401, 403):
        return Unauthorized(message + CREDENTIALS_HINT, status_code=status, detail=detail, response=response)
    if status == 404:
        return ObjectNotFound(message, status_code=status, detail=detail, response=response)
    return APIError(message, status_code=status, detail=detail, response=response)


class Transport:
    """Sends a worker's state proposals: socket when the open connection offers it, else REST.

    Args:
        client: the REST client (and its settings: ``SYNC_WORKER_FAST_PATH`` is read
            through it, by the subscription).
        subscription: the worker's subscription, whose current connection says whether
            ``set_state`` may go over the socket (None: REST only).
    """

    def __init__(self, client: Client, subscription: Any = None) -> None:
        self.client = client
        self.subscription = subscription

    @property
    def states_over_socket(self) -> bool:
        """Whether the next proposal goes over the subscription socket."""
        sub = self.subscription
        return sub is not None and bool(sub.supports_set_state)

    def set_state(self, task_run_id: str, state: State, *, force: bool = False,
                  timeout: float = 30.0) -> OrchestrationResult:
        """One attempt at proposing ``state`` (no retry here: see the module docstring).

        Over the socket when :attr:`states_over_socket`; if the socket is not connected
        or breaks before the answer, over REST at once (one request). Error answers raise
        :func:`error_for`'s exceptions on both paths; connection errors of the REST request
        propagate (``requests.ConnectionError``/``Timeout``) for the caller's retry rule.
        """
        if self.states_over_socket:
            from sync_worker.sockets import ConnectionLost
            from sync_worker.subscription import FastPathUnavailable

            try:
                return self.subscription.set_state(task_run_id, state, force=force, timeout=timeout)
            except (FastPathUnavailable, ConnectionLost) as exc:
                logger.debug("set_state over the socket failed (%s); proposing %s over REST", exc, state.name)
        return self.client.set_task_run_state(task_run_id, state, force=force, retry=False)

    def hand_back(self, task_run_id: str) -> bool:
        """Give an acknowledged run back to the queue now, unstarted (the embedded
        server's ``release_run`` extension). False when the open connection cannot
        (a Prefect server, no connection): then the server's own rules apply (the lease
        on the embedded server)."""
        sub = self.subscription
        return sub is not None and sub.hand_back(task_run_id)


__all__ = ["Transport", "error_for"]
