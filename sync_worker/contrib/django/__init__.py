"""Django integration: a backend for Django's Tasks framework and a worker for Django projects.

Settings::

    INSTALLED_APPS = [..., "sync_worker.contrib.django"]      # the manage.py sync_worker command
    TASKS = {"default": {"BACKEND": "sync_worker.contrib.django.SyncWorkerBackend"}}

Works with Django >= 6.0 (``django.tasks``) and Django 5.2 with the ``django-tasks``
backport. ``SyncWorkerBackend`` is imported on first use, so listing this package in
``INSTALLED_APPS`` costs nothing at startup.
"""
from __future__ import annotations

from typing import Any


__all__ = ["SyncWorkerBackend", "start_in_process_worker"]


def __getattr__(name: str) -> Any:
    if name == "SyncWorkerBackend":
        from sync_worker.contrib.django.backend import SyncWorkerBackend

        return SyncWorkerBackend
    if name == "start_in_process_worker":
        from sync_worker.contrib.django.inprocess import start_in_process_worker

        return start_in_process_worker
    raise AttributeError(f"module 'sync_worker.contrib.django' has no attribute {name!r}")
