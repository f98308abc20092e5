"""The errors of :mod:`sync_worker.exceptions` that subclass ``requests.HTTPError``.

Apart so that importing :mod:`sync_worker.exceptions` does not import requests: the embedded
server imports that module (``ConfigurationError``) and never makes an HTTP request, and
requests with its dependencies is ~6 MB of the server's resident memory. Import these names
from :mod:`sync_worker.exceptions` (which loads this module on first use), not from here.
"""
from __future__ import annotations

from typing import Any, Optional

import requests

from sync_worker.exceptions import SyncWorkerError


class APIError(requests.HTTPError, SyncWorkerError):
    """The API answered with an error status.

    A subclass of ``requests.HTTPError`` so code that already treats HTTP errors (for
    example ``critical_service_loop``, which forgives 5xx) handles it without knowing us.
    """

    __module__ = "sync_worker.exceptions"

    def __init__(self, message: str, *, status_code: int, detail: Any = None, response: Optional[requests.Response] = None):
        super().__init__(message, response=response)
        self.status_code = status_code
        self.detail = detail


class ObjectNotFound(APIError):
    """404: the task run (or record) does not exist on this server."""

    __module__ = "sync_worker.exceptions"


class Unauthorized(APIError):
    """401/403: the credentials are missing or wrong."""

    __module__ = "sync_worker.exceptions"
