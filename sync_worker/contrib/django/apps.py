"""The app that provides ``manage.py sync_worker`` and, if asked, the in-process worker."""
from __future__ import annotations

from django.apps import AppConfig


class SyncWorkerConfig(AppConfig):
    name = "sync_worker.contrib.django"
    label = "sync_worker"
    verbose_name = "sync_worker"

    def ready(self) -> None:
        from django.conf import settings

        if getattr(settings, "SYNC_WORKER_IN_PROCESS", False):
            from sync_worker.contrib.django.inprocess import install

            install(settings.SYNC_WORKER_IN_PROCESS)
