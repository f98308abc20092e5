"""Tasks for the benchmarks: a no-op, with pinned keys so submitter and worker agree."""
from sync_worker import task


@task(task_key="bench.noop")
def noop() -> None:
    return None


@task(task_key="bench.echo")
def echo(x: int) -> int:
    return x


@task(task_key="bench.started_at")
def started_at(i: int) -> float:
    """When it started (benchmarks/delayed_latency.py)."""
    import time

    return time.time()
