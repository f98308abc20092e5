#!/usr/bin/env python3
"""Where the idle submit -> result time goes: one timeline across the three processes.

Usage:
    python3 benchmarks/latency_breakdown.py                  # 100 sequential runs, this tree
    python3 benchmarks/latency_breakdown.py --samples 300 --src /tmp/old-tree --show 1
    python3 benchmarks/latency_breakdown.py --drain 5000     # a create's round trip in a drain

Starts ``sync-worker server`` and ``sync-worker worker --limit 10`` (from ``--src``), then in
this process submits one no-op run at a time and waits for its result (``.delay().result()``,
as the ``latency`` case of compare.py does). Every process records events with a
``CLOCK_MONOTONIC`` timestamp, which all processes share: each socket send and receive (the
first bytes show which message it is; client frames are masked), each SQLite group commit of
the server (``SQLiteDatabase._run_batch``), the worker's hand-off of a delivered run
(``TaskWorker._start_delivered``, ``_safe_run``), the task body, and ``delay()`` /
``result()`` in the submitter. The script then walks each sample's events in order and prints
the median of every step, e.g. "server: create read -> commit begins".

The hooks cost a few microseconds per event (one ``os.write``), so the traced total is a
little higher than compare.py's untraced p50; the steps are what to compare. A step the
script cannot find (an older or newer tree without a hooked function) makes it say so and
print the raw timeline of one sample instead (``--show N`` prints N samples anyway).
"""
from __future__ import annotations

import argparse
import bisect
import functools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASK_KEY = "latency_breakdown.noop"

_fd: int | None = None


def event(what: str, detail: str = "") -> None:
    """One line: monotonic ns, pid, thread, event, detail (appended to this process's file)."""
    global _fd
    if _fd is None:
        _fd = os.open(os.path.join(os.environ["LATENCY_TRACE_DIR"], f"{os.getpid()}.log"),
                      os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    thread = threading.current_thread().name[:28].replace(" ", "_")
    os.write(_fd, f"{time.monotonic_ns()} {os.getpid()} {thread} {what} {detail}\n".encode())


def _peek(data) -> str:
    head = bytes(data[:72])
    return repr(head[2:] if len(head) > 2 else head)


def hook_sockets() -> None:
    cls = socket.socket
    send, sendall, recv, recv_into = cls.send, cls.sendall, cls.recv, cls.recv_into

    def traced_send(self, data, *args):
        event("send", f"n{len(data)} {_peek(data)}")
        return send(self, data, *args)

    def traced_sendall(self, data, *args):
        event("send", f"n{len(data)} {_peek(data)}")
        try:
            return sendall(self, data, *args)
        finally:
            event("sent", f"n{len(data)}")

    def traced_recv(self, size, *args):
        data = recv(self, size, *args)
        event("recv", f"n{len(data)} {_peek(data)}")
        return data

    def traced_recv_into(self, buffer, *args):
        n = recv_into(self, buffer, *args)
        event("recv", f"n{n} {_peek(memoryview(buffer)[:n])}")
        return n

    cls.send, cls.sendall, cls.recv, cls.recv_into = traced_send, traced_sendall, traced_recv, traced_recv_into

    # the client's frames leave through sockets.send_all (one os.write when they fit), not sendall
    from sync_worker import sockets as client_sockets

    send_all = getattr(client_sockets, "send_all", None)
    if send_all is not None:
        def traced_send_all(sock, data):
            event("send", f"n{len(data)} {_peek(data)}")
            return send_all(sock, data)

        client_sockets.send_all = traced_send_all


def hook(owner, name: str, label: str) -> None:
    """Events ``label>`` and ``label<`` around ``owner.name`` (skipped if it does not exist)."""
    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def traced(*args, **kwargs):
        event(label + ">")
        try:
            return original(*args, **kwargs)
        finally:
            event(label + "<")

    setattr(owner, name, traced)


def hook_detail(owner, name: str, label: str, detail) -> None:
    """Events ``label>`` (with ``detail(*args)``, e.g. the run ids) and ``label<`` around ``owner.name``."""
    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def traced(*args, **kwargs):
        try:
            text = detail(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a trace never breaks the traced code
            text = f"?{exc!r}"
        event(label + ">", text)
        try:
            return original(*args, **kwargs)
        finally:
            event(label + "<", text)

    setattr(owner, name, traced)


def _short_hooks(role: str) -> None:
    """``--short``: hooks that name the runs, to follow one slot's cycle by run id."""
    if role == "server":
        from sync_worker.server import subscriptions

        hook_detail(subscriptions.Subscription, "_set_state", "srv_set_state",
                    lambda self, value: str(value.get("task_run_id")))
        # the final states that freed the slots (before) -> the runs claimed with their credit (taken)
        hook_detail(subscriptions.Subscription, "_claim_and_send", "claim_send",
                    lambda self, taken, before=None: ",".join(b[0] for b in before or ()) + "->"
                    + ",".join(t[0] for t in taken))
        hook_detail(subscriptions.Subscription, "deliver_reserved", "at_create", lambda self, run_id, text: run_id)
        from sync_worker.server import core

        # returns once the claim is committed, by this thread or by the database's writer thread
        hook(core.Core, "claim_at_delivery", "claimed")
    else:
        from sync_worker import subscription, worker

        hook_detail(worker.TaskWorker, "_start_delivered", "start_delivered",
                    lambda self, task_run, dialect: task_run.id)
        hook_detail(worker.TaskWorker, "_safe_run", "safe_run", lambda self, task, task_run, *a, **k: task_run.id)
        hook_detail(subscription.Subscription, "set_state_async", "final",
                    lambda self, run_id, state, *a, **k: run_id)


def _drain_hooks(role: str) -> None:
    """``--drain``: hooks that name the rpc requests, to follow each create by its request_id."""
    if role == "server":
        from sync_worker.server import rpc, subscriptions

        hook_detail(rpc.RpcChannel, "_create", "srv_create", lambda self, request_id, *a, **k: request_id)
        hook_detail(rpc.RpcChannel, "_reply", "srv_reply", lambda self, kind, request_id, *a, **k: request_id)
        hook(rpc.RpcChannel, "_drain", "rpc_pass")
        hook(subscriptions.Subscription, "_drain", "sub_pass")


def _role(role: str, argv: list[str]) -> None:
    """A traced ``sync-worker server`` or ``worker`` process (this file run with --_role)."""
    import runpy

    hook_sockets()
    if os.environ.get("LATENCY_TRACE_SHORT"):
        from sync_worker.server import database

        hook(database.SQLiteDatabase, "_run_batch", "commit")
        _short_hooks(role)
    elif os.environ.get("LATENCY_TRACE_DRAIN"):
        from sync_worker.server import database

        hook(database.SQLiteDatabase, "_run_batch", "commit")
        _drain_hooks(role)
    elif role == "server":
        from sync_worker.server import database

        hook(database.SQLiteDatabase, "_run_batch", "commit")
    else:
        from sync_worker import worker

        hook(worker.TaskWorker, "_start_delivered", "start_delivered")
        hook(worker.TaskWorker, "_safe_run", "safe_run")
    sys.argv = ["sync_worker", *argv]
    runpy.run_module("sync_worker", run_name="__main__")


if os.environ.get("LATENCY_TRACE_DIR") and os.environ.get("LATENCY_TRACE_TASKS"):
    from sync_worker import task

    @task(task_key=TASK_KEY)
    def noop() -> None:
        event("TASK")

    @task(task_key=TASK_KEY + "_sleep10")
    def sleep10() -> None:
        event("TASK>")
        time.sleep(0.01)
        event("TASK<")


# ----------------------------------------------------------------------------- analysis
def _print_steps(names: list[str], rows: list[list[float]]) -> None:
    """One line per step: its median and mean (µs) over ``rows`` (one list of steps per trace)."""
    print("  median   mean  step")
    for k, name in enumerate(names):
        col = [r[k] for r in rows]
        print(f"  {statistics.median(col):6.0f} {statistics.fmean(col):6.0f}  {name}")


def _is(kind: str, text: str = "", pid: str | None = None, not_pid: str | None = None):
    def match(e: list[str]) -> bool:
        return (e[3] == kind and text in e[4] and (pid is None or e[1] == pid)
                and (not_pid is None or e[1] != not_pid))
    return match


def analyse(events: list[list[str]], show: int) -> None:
    marks = [i for i, e in enumerate(events) if e[3] == "ITER"]
    sub = events[marks[0]][1]
    first = [  # the submitter's path, from the start of delay()
        ("submitter: delay() -> create frame sent", _is("send", pid=sub)),
        ("wire + wake-up: server reads the create", _is("recv", not_pid=sub)),
        ("server: create read -> its commit begins", _is("commit>")),
        ("server: create commit", _is("commit<")),
        ("server: commit -> create_result sent", _is("send", "create_result")),
        ("wire + wake-up: submitter reads create_result", _is("recv", "create_result", pid=sub)),
        ("submitter: parse + hand-off, delay() returns", _is("delay<")),
        ("submitter: result() -> wait frame sent", _is("send", pid=sub)),
    ]
    run_frame = lambda e: e[3] == "send" and ("cache_expiration" in e[4] or "task_runs" in e[4])  # noqa: E731
    second = [  # the run's path, from the beginning of the create's commit
        # (the run is claimed in the create's own commit and sent right after it, or claimed
        # in a second commit after the create's: both are in this step)
        ("server: create commit begins -> run frame sent", run_frame),
        ("wire + wake-up: worker reads the run", lambda e: e[3] == "recv" and ("cache_expiration" in e[4] or "task_runs" in e[4])),
        ("worker: frame + JSON + TaskRun parse -> slot taken", _is("start_delivered>")),
        ("worker: hand-off to a run thread", _is("safe_run>")),
        ("worker: engine -> task body", _is("TASK")),
        ("worker: task body -> final state frame sent", _is("send")),
        ("wire + wake-up: server reads the final state", _is("recv")),
        ("server: final state read -> its commit begins", _is("commit>")),
        # sent from the committing thread after the commit, or through the rpc sender thread
        ("server: final-state commit begins -> wait_result sent", _is("send", "wait_result")),
        ("wire + wake-up: submitter reads wait_result", _is("recv", "wait_result", pid=sub)),
        ("submitter: parse + hand-off, result() returns", _is("result<")),
    ]

    def walk(sample: list[list[str]], steps, start: int) -> list[float] | None:
        out, i, t = [], start, int(sample[start][0])
        for _name, match in steps:
            j = i + 1
            while j < len(sample) and not match(sample[j]):
                j += 1
            if j >= len(sample):
                return None
            out.append((int(sample[j][0]) - t) / 1000)
            t, i = int(sample[j][0]), j
        return out

    rows1, rows2, totals, late_waits = [], [], [], 0
    for a, b in zip(marks, marks[1:], strict=False):
        sample = events[a:b]
        commits = [k for k, e in enumerate(sample) if e[3] == "commit<"]
        begins = [k for k, e in enumerate(sample) if e[3] == "commit>"]
        one = walk(sample, first, 0)
        two = walk(sample, second, begins[0]) if begins else None
        if one is None or two is None:
            continue
        rows1.append(one)
        rows2.append(two)
        totals.append((int(sample[-1][0]) - int(sample[0][0])) / 1000)
        wait_sent = [int(e[0]) for e in sample if e[1] == sub and e[3] == "send"][1]
        if wait_sent > int(sample[commits[-1]][0]):
            late_waits += 1
    if not rows1:
        print("could not follow the steps in any sample (hooks missing in this tree?); raw timeline:")
        show = max(show, 1)
    else:
        print(f"{len(rows1)} samples; median submit -> result {statistics.median(totals):.0f} us (traced); "
              f"the wait was sent after the final state's commit in {late_waits} of them")
        print("\nThe submitter's path (from the start of delay()):")
        for k, (name, _) in enumerate(first):
            print(f"  {statistics.median(r[k] for r in rows1):7.0f} us  {name}")
        print("The run's path (from the beginning of the create's commit; in parallel with the submitter's):")
        for k, (name, _) in enumerate(second):
            print(f"  {statistics.median(r[k] for r in rows2):7.0f} us  {name}")
        print("(When the wait arrives after the final state, the steps from 'server: final-state commit begins ->\n"
              " wait_result sent' on also include the time until the wait frame was read.)")
    for a, b in list(zip(marks, marks[1:], strict=False))[len(marks) // 2:len(marks) // 2 + show]:
        t0 = int(events[a][0])
        print()
        for e in events[a:b]:
            print(f"{(int(e[0]) - t0) / 1000:8.1f} us  {e[1]} {e[2][:24]:24} {e[3]:16} {e[4][:70]}")


def analyse_short(events: list[list[str]], submitted_ns: int) -> None:
    """One slot's cycle, run X's body end -> the next run Y's body start on the slot X freed
    (Y: a run claimed with the credit X's final state carried), step by step."""
    pids = {e[1] for e in events if e[3] == "TASK<"}
    worker = pids.pop() if len(pids) == 1 else None
    server = next((e[1] for e in events if e[3] == "claim_send>"), None)
    if worker is None or server is None:
        print("could not find the worker's or the server's events (hooks missing in this tree?)")
        return
    t_of: dict[tuple[str, str], int] = {}  # (event, run id) -> index of its first occurrence
    thread_run: dict[str, str] = {}
    body: dict[tuple[str, str], int] = {}  # ("TASK>"/"TASK<", run id) -> index
    successor: dict[str, tuple[str, int, int]] = {}  # X -> (Y, claim_send> index, claim_send< index)
    open_claims: dict[str, int] = {}
    for i, e in enumerate(events):
        kind, detail = e[3], e[4]
        if kind in ("safe_run>", "start_delivered>", "final>", "srv_set_state>") and (kind, detail) not in t_of:
            t_of[(kind, detail)] = i
        if kind == "safe_run>":
            thread_run[e[2]] = detail
        elif kind in ("TASK>", "TASK<") and e[1] == worker:
            run = thread_run.get(e[2])
            if run is not None:
                body.setdefault((kind, run), i)
        elif kind == "claim_send>":
            open_claims[detail] = i
        elif kind == "claim_send<" and detail in open_claims:
            begin = open_claims.pop(detail)
            before, _, taken = detail.partition("->")
            for x, y in zip([b for b in before.split(",") if b], [t for t in taken.split(",") if t], strict=False):
                successor[x] = (y, begin, i)

    def prev_index(start: int, stop: int, pred) -> int | None:
        for j in range(start - 1, stop, -1):
            if pred(events[j]):
                return j
        return None

    def next_index(start: int, pred) -> int | None:
        for j in range(start + 1, min(len(events), start + 4000)):
            if pred(events[j]):
                return j
        return None

    names = ["worker: body end -> final state proposed (engine)",
             "worker: proposed -> its frame sent",
             "wire + wake-up: server reads it",
             "server: read -> its set_state parsed",
             "server: parsed -> claim of the next run begins",
             "server: -> the commit begins (GIL, a commit in progress)",
             "server: the commit (final states + claim)",
             "server: commit -> answers and run sent",
             "wire + wake-up: worker reads the run",
             "worker: read -> slot taken (start_delivered)",
             "worker: hand-off to a run thread",
             "worker: engine -> next body starts"]
    rows: dict[str, list[list[float]]] = {"during submission": [], "after submission": []}
    commits_between: list[int] = []
    by_writer: list[bool] = []  # per cycle followed: its claim was committed by another thread
    unpaired = 0
    for (kind, x), end in body.items():
        if kind != "TASK<":
            continue
        if x not in successor:
            unpaired += 1
            continue
        y, c_begin, c_end = successor[x]
        marks = [end, t_of.get(("final>", x)), None, None, t_of.get(("srv_set_state>", x)), c_begin, None, None,
                 None, None, t_of.get(("start_delivered>", y)), t_of.get(("safe_run>", y)), body.get(("TASK>", y))]
        if None in (marks[1], marks[4], marks[10], marks[11], marks[12]):
            unpaired += 1
            continue
        marks[2] = next_index(marks[1], lambda e: e[1] == worker and e[3] == "send")
        marks[3] = next_index(marks[2] or 0, lambda e: e[1] == server and e[3] == "recv")
        reader = events[c_begin][2]
        # the commit that carried the claim: this thread's own if it led one before its claim
        # returned, else the writer thread's that ended last before that (the claim queued
        # behind another thread's batch, then committed by the writer thread)
        claimed = next_index(c_begin, lambda e, t=reader: e[3] == "claimed<" and e[2] == t)
        elsewhere = False
        if claimed is not None:
            own = [j for j in range(c_begin, claimed) if events[j][3] == "commit<" and events[j][2] == reader]
            ends = own or [j for j in range(c_begin, claimed) if events[j][3] == "commit<"]
            if ends:
                marks[7] = ends[-1]
                elsewhere = not own
                marks[6] = prev_index(marks[7], c_begin, lambda e, t=events[ends[-1]][2]: e[3] == "commit>"
                                      and e[2] == t)
        marks[8] = next_index(marks[7] or 0, lambda e, t=reader: e[3] == "send" and e[2] == t)
        sent = events[marks[8]][4].split(" ", 1)[0] if marks[8] is not None else None
        marks[9] = next_index(marks[8] or 0, lambda e, n=sent: e[1] == worker and e[3] == "recv"
                              and e[4].startswith(n))
        if None in marks:
            unpaired += 1
            continue
        times = [int(events[m][0]) for m in marks]  # type: ignore[index]
        steps = [(b - a) / 1000 for a, b in zip(times, times[1:], strict=False)]
        if min(steps) < 0:
            unpaired += 1
            continue
        commits_between.append(sum(1 for j in range(c_begin, marks[7] + 1) if events[j][3] == "commit<"))
        by_writer.append(elsewhere)
        phase = "during submission" if times[0] < submitted_ns else "after submission"
        rows[phase].append(steps)
    for phase, found in rows.items():
        if not found:
            continue
        totals = [sum(r) for r in found]
        print(f"\n{phase}: {len(found)} slot cycles; body end -> next body start median "
              f"{statistics.median(totals):.0f} us, mean {statistics.fmean(totals):.0f} us")
        _print_steps(names, found)
    _bodies(events, worker)
    if commits_between:
        alone = sum(1 for n in commits_between if n <= 1)
        print(f"\nno other commit ended between the claim and its own commit (the claim did not wait behind "
              f"another batch) in {alone} of {len(commits_between)} cycles; the claim was committed by another "
              f"thread (queued behind a batch in progress) in {sum(by_writer)} of them; cycles not followed: "
              f"{unpaired}")


def analyse_drain(events: list[list[str]], sub: str, started_ns: int, submitted_ns: int) -> None:
    """Each create of the drain, by its request_id, from ``delay()`` to its return, step by
    step across the submitter and the server (shared CLOCK_MONOTONIC)."""
    server = next((e[1] for e in events if e[3] == "srv_create>"), None)
    if server is None:
        print("could not find the server's rpc events (hooks missing in this tree?)")
        return
    names = ["submitter: delay() -> create frame built (send_json)",
             "submitter: send_json -> frame sent",
             "wire + wake-up: server recv of the read that carried it",
             "server: recv -> create handled (parse, others in the pass)",
             "server: handled -> the commit that carried it begins",
             "server: commit begins -> reply made (commit + earlier callbacks)",
             "server: reply made -> reply sent",
             "wire + wake-up: submitter reader dispatches it",
             "submitter: dispatch -> delay() returns (thread wakes)"]
    idx: dict[tuple[str, str], int] = {}
    last_recv: dict[str, int] = {}  # server thread -> index of its last recv
    last_commit: dict[str, int] = {}  # server thread -> index of its last commit>
    delay_open: dict[str, int] = {}  # submitter thread -> index of delay>
    rid_thread: dict[str, tuple[str, int]] = {}  # rid -> (submitter thread, delay> index)
    recv_of: dict[str, int] = {}
    commit_of: dict[str, int] = {}
    done: dict[str, int] = {}  # rid -> delay< index
    thread_rid: dict[str, str] = {}
    batch: dict[int, int] = {}  # commit> index -> creates answered in it
    sends: list[int] = []  # server send indexes
    busy = {"rpc_pass": 0, "sub_pass": 0, "commit": 0}
    opened: dict[tuple[str, str], int] = {}
    for i, e in enumerate(events):
        pid, thread, kind, detail = e[1], e[2], e[3], e[4]
        if pid == sub:
            if kind == "delay>":
                delay_open[thread] = i
            elif kind == "send_json>" and thread in delay_open:
                rid_thread[detail] = (thread, delay_open[thread])
                thread_rid[thread] = detail
                idx[("send_json>", detail)] = i
            elif kind == "send_json<" and thread_rid.get(thread) == detail:
                idx.setdefault(("send_json<", detail), i)
            elif kind == "dispatch>":
                idx.setdefault(("dispatch>", detail), i)
            elif kind == "delay<" and thread in thread_rid:
                done[thread_rid.pop(thread)] = i
                delay_open.pop(thread, None)
        elif pid == server:
            if kind == "recv":
                last_recv[thread] = i
            elif kind == "commit>":
                last_commit[thread] = i
            elif kind == "send":
                sends.append(i)
            elif kind == "srv_create>":
                idx.setdefault(("srv_create>", detail), i)
                if thread in last_recv:
                    recv_of.setdefault(detail, last_recv[thread])
            elif kind == "srv_reply>" and detail not in commit_of and thread in last_commit:
                idx[("srv_reply>", detail)] = i
                commit_of[detail] = last_commit[thread]
                batch[last_commit[thread]] = batch.get(last_commit[thread], 0) + 1
            base = kind[:-1]
            if base in busy and submitted_ns >= int(e[0]) >= started_ns:
                if kind[-1] == ">":
                    opened[(thread, base)] = int(e[0])
                elif (thread, base) in opened:
                    busy[base] += int(e[0]) - opened.pop((thread, base))

    rows: list[list[float]] = []
    for rid, (_thread, begin) in rid_thread.items():
        marks = [begin, idx.get(("send_json>", rid)), idx.get(("send_json<", rid)), recv_of.get(rid),
                 idx.get(("srv_create>", rid)), commit_of.get(rid), idx.get(("srv_reply>", rid)), None,
                 idx.get(("dispatch>", rid)), done.get(rid)]
        if marks[6] is not None:
            k = bisect.bisect_right(sends, marks[6])
            marks[7] = sends[k] if k < len(sends) else None
        if None in marks:
            continue
        t = [int(events[m][0]) for m in marks]  # type: ignore[index]
        if not started_ns <= t[0] <= submitted_ns:
            continue
        steps = [(b - a) / 1000 for a, b in zip(t, t[1:], strict=False)]
        if min(steps) < 0:
            continue
        rows.append(steps)
    if not rows:
        print("could not follow any create (hooks missing in this tree?)")
        return
    totals = [sum(r) for r in rows]
    span = (submitted_ns - started_ns) / 1e9
    print(f"{len(rows)} creates followed; delay() median {statistics.median(totals):.0f} us, mean "
          f"{statistics.fmean(totals):.0f} us, p90 {sorted(totals)[int(0.9 * len(totals))]:.0f} us")
    _print_steps(names, rows)
    commits = sum(1 for e in events if e[1] == server and e[3] == "commit<" and started_ns <= int(e[0]) <= submitted_ns)
    creates = sum(1 for e in events if e[1] == server and e[3] == "srv_create>" and started_ns <= int(e[0]) <= submitted_ns)
    print(f"\ncommits in the submission's span: {commits} for {creates} creates ({commits / max(creates, 1):.2f} per create)")
    sizes = list(batch.values())
    print(f"commits that answered creates: {len(sizes)}, creates per commit median "
          f"{statistics.median(sizes):.0f}, mean {statistics.fmean(sizes):.1f}")
    print("server thread time in the submission's span ({:.2f} s): ".format(span)
          + ", ".join(f"{k} {100 * v / 1e9 / span:.0f} %" for k, v in busy.items()))


def _bodies(events: list[list[str]], worker: str) -> None:
    """How long the 10 ms bodies themselves took (``time.sleep(0.01)`` wakes late, and its
    thread then needs the GIL: that share of the ideal is lost before any messaging), and how
    busy the slots were from the first body's start to the last one's end."""
    begun: dict[str, int] = {}
    spans: list[tuple[int, int]] = []
    for e in events:
        if e[1] != worker or e[3] not in ("TASK>", "TASK<"):
            continue
        if e[3] == "TASK>":
            begun[e[2]] = int(e[0])
        elif e[2] in begun:
            spans.append((begun.pop(e[2]), int(e[0])))
    if not spans:
        return
    lengths = [(b - a) / 1000 for a, b in spans]
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    busy = sum(b - a for a, b in spans) / ((last - first) * 10) if last > first else 0.0
    print(f"\nthe bodies (a 10 ms sleep): median {statistics.median(lengths):.0f} us, mean "
          f"{statistics.fmean(lengths):.0f} us, so at most {100 * 10_000 / statistics.fmean(lengths):.1f} % of the "
          f"ideal even with no time between them; the 10 slots were busy {100 * busy:.1f} % of the time from "
          f"the first body's start to the last one's end")


# ----------------------------------------------------------------------------- driver
def _submit_from_threads(task, total: int, threads: int) -> None:
    """``task.delay()`` ``total`` times from ``threads`` threads (shares as even as they go)."""
    shares = [total // threads + (1 if i < total % threads else 0) for i in range(threads)]

    def submit(share: int) -> None:
        for _ in range(share):
            task.delay()

    running = [threading.Thread(target=submit, args=(share,)) for share in shares if share]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()


def _run_short(tasks_module, args, trace_dir: str, worker_pid: int) -> int:
    """Submit ``args.short`` sleep10 runs from ``args.threads`` threads, wait until the worker
    has run them all; returns when the submission ended (monotonic ns)."""
    started = time.monotonic()
    _submit_from_threads(tasks_module.sleep10, args.short, args.threads)
    submitted_ns = time.monotonic_ns()
    log = Path(trace_dir) / f"{worker_pid}.log"
    deadline = time.monotonic() + 120
    while log.read_bytes().count(b" TASK< ") < args.short:
        if time.monotonic() > deadline:
            raise SystemExit("the short runs did not finish within 120 s")
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    print(f"{args.short} runs of 10 ms, limit 10, from {args.threads} threads: submitted in "
          f"{(submitted_ns / 1e9 - started):.3f} s, all run by {elapsed:.3f} s (traced; ideal "
          f"{args.short / 1000:.3f} s: {100 * args.short / 1000 / elapsed:.0f} %, includes the polling)")
    time.sleep(0.3)
    return submitted_ns


def _run_drain(tasks_module, args, trace_dir: str, worker_pid: int) -> tuple[int, int]:
    """Submit ``args.drain`` no-op runs from ``args.threads`` threads, wait until the worker has
    run them all; returns (submission began, submission ended) in monotonic ns."""
    log = Path(trace_dir) / f"{worker_pid}.log"
    before = log.read_bytes().count(b" TASK ")
    started_ns = time.monotonic_ns()
    _submit_from_threads(tasks_module.noop, args.drain, args.threads)
    submitted_ns = time.monotonic_ns()
    deadline = time.monotonic() + 300
    while log.read_bytes().count(b" TASK ") < before + args.drain:
        if time.monotonic() > deadline:
            raise SystemExit("the drain did not finish within 300 s")
        time.sleep(0.05)
    elapsed = (time.monotonic_ns() - started_ns) / 1e9
    print(f"{args.drain} no-op runs from {args.threads} threads: submitted in {(submitted_ns - started_ns) / 1e9:.3f} s "
          f"({args.drain * 1e9 / (submitted_ns - started_ns):.0f} creates/s), all run by {elapsed:.3f} s "
          f"(traced, includes the polling)")
    time.sleep(0.3)
    return started_ns, submitted_ns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--src", default=str(REPO), help="the sync_worker tree to run (default: this one)")
    parser.add_argument("--show", type=int, default=0, help="also print the raw timeline of N samples")
    parser.add_argument("--short", type=int, default=0, metavar="N",
                        help="instead: N runs that sleep 10 ms submitted from --threads threads (compare.py's "
                             "short case), and one slot's cycle traced step by step")
    parser.add_argument("--drain", type=int, default=0, metavar="N",
                        help="instead: N no-op runs submitted from --threads threads (compare.py's drain case), "
                             "and each create's round trip traced step by step")
    parser.add_argument("--threads", type=int, default=4, help="submitter threads with --short/--drain (default 4)")
    parser.add_argument("--_role", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args._role:
        _role(args._role, rest)
        return
    src = str(Path(args.src).resolve())
    trace_dir = tempfile.mkdtemp(prefix="latency-trace-")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, str(HERE)]), LATENCY_TRACE_DIR=trace_dir,
               LATENCY_TRACE_TASKS="1", SYNC_WORKER_API_URL=f"http://127.0.0.1:{port}/api",
               SYNC_WORKER_STORAGE=os.path.join(trace_dir, "records"))
    if args.short:
        env["LATENCY_TRACE_SHORT"] = "1"
    elif args.drain:
        env["LATENCY_TRACE_DRAIN"] = "1"
    me = [sys.executable, str(Path(__file__).resolve())]
    procs = [subprocess.Popen([*me, "--_role", "server", "server", "--port", str(port), "--db",
                               os.path.join(trace_dir, "server.db"), "--log-level", "WARNING"],
                              env=env, cwd=src, start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.02)
        procs.append(subprocess.Popen([*me, "--_role", "worker", "worker", "latency_breakdown:noop",
                                       "latency_breakdown:sleep10", "--limit", "10", "--log-level", "WARNING"],
                                      env=env, cwd=src, start_new_session=True))
        os.environ.update({k: v for k, v in env.items() if k.startswith(("SYNC_WORKER_", "LATENCY_"))})
        sys.path[:0] = [src, str(HERE)]
        hook_sockets()
        import latency_breakdown as tasks_module  # the task, as the worker imports it

        from sync_worker import tasks

        hook(tasks.Task, "apply_async", "delay")
        hook(tasks.TaskRunFuture, "result", "result")
        if args.drain:
            from sync_worker import sockets as client_sockets

            hook_detail(client_sockets.Connection, "send_json", "send_json",
                        lambda self, message: str(message.get("request_id")))
            hook_detail(client_sockets.Connection, "_dispatch", "dispatch",
                        lambda self, message: str(message.get("request_id")) if isinstance(message, dict) else "")
        for _ in range(20):  # warm-up (connections, caches)
            tasks_module.noop.delay().result(timeout=60)
        if args.short:
            submitted_ns = _run_short(tasks_module, args, trace_dir, procs[1].pid)
        elif args.drain:
            started_ns, submitted_ns = _run_drain(tasks_module, args, trace_dir, procs[1].pid)
        for _ in range(0 if args.short or args.drain else args.samples + 1):
            event("ITER")
            tasks_module.noop.delay().result(timeout=60)
        event("ITER")
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    events = []
    for path in Path(trace_dir).glob("*.log"):
        for line in path.read_text().splitlines():
            fields = line.split(" ", 4)
            events.append(fields + [""] * (5 - len(fields)))
    events.sort(key=lambda e: int(e[0]))
    if args.short:
        analyse_short(events, submitted_ns)
    elif args.drain:
        analyse_drain(events, str(os.getpid()), started_ns, submitted_ns)
    else:
        analyse(events, args.show)


if __name__ == "__main__":
    main()
