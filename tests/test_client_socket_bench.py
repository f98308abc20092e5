"""``benchmarks/submit_cpu.py --socket`` runs: the real rpc socket against its trivial server
subprocess, every request answered (a create answered otherwise fails the run), and the
figures it reports are there and plausible."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="context switches are read from /proc")
@pytest.mark.parametrize("threads", [1, 3])
def test_the_socket_round_trip_benchmark_measures_real_requests(threads):
    out = subprocess.run([sys.executable, "benchmarks/submit_cpu.py", "--socket", "--runs", "60", "--threads", str(threads)],
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    found = re.search(r"([\d.]+) µs CPU per rpc create in this process, round trip p50 (\d+) µs \((\d+) requests from "
                      rf"{threads} thread\(s\).*callers ([\d.]+) voluntary", out.stdout)
    assert found, out.stdout
    cpu, p50, done, switches = float(found[1]), int(found[2]), int(found[3]), float(found[4])
    assert done == 60 // threads * threads and cpu > 0 and p50 > 0
    assert switches > 0  # a caller waits for every answer: it sleeps at least once per request
