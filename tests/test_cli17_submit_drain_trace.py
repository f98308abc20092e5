"""``benchmarks/submit_cpu.py --drain``: a real server and worker drain the runs it submits, and
every step of the create round trip it reports is there, measured on the creates it made."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_the_drain_trace_reports_every_step_of_real_create_round_trips():
    out = subprocess.run([sys.executable, "benchmarks/submit_cpu.py", "--drain", "--runs", "300", "--threads", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stdout + out.stderr
    head = re.search(r"drain of 300 no-op runs from 2 thread\(s\): ([\d,]+) runs/s; CPU ms per run: server ([\d.]+), "
                     r"worker ([\d.]+), this process ([\d.]+)", out.stdout)
    assert head, out.stdout
    assert int(head[1].replace(",", "")) > 0 and all(float(head[k]) > 0 for k in (2, 3, 4))
    assert re.search(r"create round trip, 300 creates traced", out.stdout), out.stdout
    steps = dict((name, (float(median), float(mean))) for median, mean, name in
                 re.findall(r"^\s+(\d+)\s+(\d+)  (\S.*)$", out.stdout, re.M))
    names = ["server + wire (requested -> the reader's read returns)",
             "reader: frames, JSON, dispatch (read -> answer handed over)",
             "wake-up (handed over -> the caller runs)", "round trip (requested -> the caller runs)",
             "caller: its Python between two creates (runs -> next requested)"]
    assert set(names) <= set(steps), out.stdout
    # a round trip holds its parts: it is never shorter than the server's share of it
    assert steps[names[3]][1] >= steps[names[0]][1] > 0
    answers = re.search(r"answers per read: (.*)", out.stdout)
    assert answers, out.stdout
    counted = sum(int(n) * int(reads) for n, reads in re.findall(r"(\d+): (\d+) reads", answers[1]))
    assert counted == 300  # every traced create's answer came with exactly one read
