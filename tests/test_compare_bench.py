"""``benchmarks/compare.py``: rounds rotate which system goes first (a position that the
machine's steal favours or punishes must not land on the same system every round), and every
case reports the steal it saw."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402


def test_steal_is_the_share_of_the_machines_time_the_hypervisor_took():
    #          user nice system idle iowait irq softirq steal
    before = [100, 0, 50, 800, 0, 0, 0, 50]
    after = [200, 0, 100, 1000, 0, 0, 0, 100]  # 400 ticks in all, 50 of them stolen
    assert compare.steal_pct(before, after) == pytest.approx(12.5)
    assert compare.steal_pct(before, before) is None  # no time passed
    assert compare.steal_pct([], after) is None  # no /proc/stat


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU time is read from /proc")
@pytest.mark.timeout(240)
def test_rounds_start_one_system_later_each_time_and_report_steal(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/compare.py", "--systems", "sync_worker", "--workers", "1,2",
                          "--cases", "drain", "--rounds", "3", "--runs", "60", "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = re.findall(r"round (\d) (sync_worker\S*): drain [\d,]+/s cpu [\d.]+ms steal \d+%", out.stderr)
    assert trials == [("1", "sync_worker"), ("1", "sync_worker*2"),
                      ("2", "sync_worker*2"), ("2", "sync_worker"),
                      ("3", "sync_worker"), ("3", "sync_worker*2")], out.stderr
    assert "3 interleaved rounds (each starting one system later)" in out.stdout
    assert re.search(r"steal, per cent of this machine's CPU time, every trial and case\): [\d.]+ \(", out.stdout)
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(row["round"], row["system"]) for row in rows] == [(int(n), system) for n, system in trials]
    assert all(0 <= row["drain"]["steal_pct"] <= 100 for row in rows)
