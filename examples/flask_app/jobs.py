"""Tasks of the Flask example. Explicit keys: independent of how the module is imported."""
from __future__ import annotations

import time

from sync_worker import task


@task(task_key="flask_app.send_welcome_email")
def send_welcome_email(address: str) -> str:
    time.sleep(0.05)  # pretend to talk to an SMTP server
    return f"welcome email sent to {address}"


@task(task_key="flask_app.multiply")
def multiply(x: float, y: float) -> float:
    return x * y


ALL_TASKS = [send_welcome_email, multiply]
