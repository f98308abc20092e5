"""A Flask app that submits background runs from its views.

Needs Flask and gunicorn: ``python3 -m pip install '.[examples]'`` from the repository root.
Run it with the worker threads inside each gunicorn worker process (see gunicorn.conf.py)::

    sync-worker server &
    cd examples/flask_app && gunicorn -c gunicorn.conf.py app:app

    curl -X POST 'http://127.0.0.1:8000/multiply?x=6&y=7'    # {"task_run_id": "..."}
    curl 'http://127.0.0.1:8000/result/<task_run_id>?wait=10' # {"result": 42.0, "state": "COMPLETED"}
"""
from __future__ import annotations

from flask import Flask, jsonify, request
from jobs import multiply, send_welcome_email

from sync_worker import TaskRunFuture

app = Flask(__name__)


@app.post("/multiply")
def submit_multiply():
    future = multiply.delay(float(request.args["x"]), float(request.args["y"]))
    return jsonify(task_run_id=future.task_run_id), 202


@app.post("/welcome")
def submit_welcome():
    future = send_welcome_email.delay(request.args["address"])
    return jsonify(task_run_id=future.task_run_id), 202


@app.get("/result/<task_run_id>")
def result(task_run_id: str):
    """The result if the run has finished; 202 while it is still going."""
    future = TaskRunFuture(task_run_id)
    wait = float(request.args.get("wait", 0))
    state = future.wait(timeout=wait)
    if not state.is_terminal():
        return jsonify(state=state.type.value, name=state.name), 202
    value = future.result(raise_on_failure=False)
    if state.is_completed():
        return jsonify(state=state.type.value, result=value)
    return jsonify(state=state.type.value, error=state.message), 500
