"""Settings of the example project: SQLite, Django's Tasks framework on sync_worker.

Environment (all optional): DJANGO_DB_PATH (the SQLite file), DJANGO_CONN_MAX_AGE
(seconds a connection is kept; Django's default 0 closes it after each request or run;
"none": forever), DJANGO_DB_ENGINE=postgresql with DJANGO_DB_HOST/PORT/NAME/USER,
DJANGO_CONN_HEALTH_CHECKS=1 and DJANGO_PG_OPTIONS (libpq "options", e.g. "-c x=y"),
SYNC_WORKER_IN_PROCESS=1 (run the worker inside the web process), and sync_worker's own
SYNC_WORKER_API_URL / SYNC_WORKER_STORAGE / ... (see the README).
"""
import os
from pathlib import Path

import django

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.staticfiles",
    "sync_worker.contrib.django",   # provides `manage.py sync_worker`
    "notes",
]
if django.VERSION < (6, 0):
    INSTALLED_APPS.insert(0, "django_tasks")  # the backport of django.tasks (Django 5.2)

MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "mysite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
WSGI_APPLICATION = "mysite.wsgi.application"

_conn_max_age = os.environ.get("DJANGO_CONN_MAX_AGE", "0")
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB_PATH", str(BASE_DIR / "db.sqlite3")),
        "CONN_MAX_AGE": None if _conn_max_age == "none" else int(_conn_max_age),
        # web process and worker write the same file: wait for the other's lock instead
        # of failing at once with "database is locked"
        "OPTIONS": {"timeout": 20},
    }
}

if os.environ.get("DJANGO_DB_ENGINE") == "postgresql":  # the tests run the example on PostgreSQL too
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("DJANGO_DB_NAME", "postgres"),
            "USER": os.environ.get("DJANGO_DB_USER", "postgres"),
            "HOST": os.environ.get("DJANGO_DB_HOST", "127.0.0.1"),
            "PORT": os.environ.get("DJANGO_DB_PORT", "5432"),
            "CONN_MAX_AGE": DATABASES["default"]["CONN_MAX_AGE"],
            "CONN_HEALTH_CHECKS": os.environ.get("DJANGO_CONN_HEALTH_CHECKS") == "1",
            "OPTIONS": {"options": os.environ["DJANGO_PG_OPTIONS"]} if os.environ.get("DJANGO_PG_OPTIONS") else {},
        }
    }

TASKS = {
    "default": {
        "BACKEND": "sync_worker.contrib.django.SyncWorkerBackend",
        "QUEUES": ["default", "emails"],
        # Anything not given here falls back to SYNC_WORKER_* / PREFECT_* variables:
        # "OPTIONS": {"API_URL": "http://127.0.0.1:4200/api", "STORAGE": "server"},
    }
}

# Run the task worker inside the web process (single-process deployments only; see
# sync_worker/contrib/django/inprocess.py for where it starts and where it must not).
SYNC_WORKER_IN_PROCESS = os.environ.get("SYNC_WORKER_IN_PROCESS") == "1"

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# sync_worker logs under "sync_worker.*" (the worker's start, stop and every failed run)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"sync_worker": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
