"""``benchmarks/compare.py``: rounds rotate which system goes first (a position that the
machine's steal favours or punishes must not land on the same system every round), and every
case reports the steal it saw."""
from __future__ import annotations

import json
import re
import statistics
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


def test_median_interval_brackets_the_median_and_narrows_with_more_rounds():
    assert compare.median_interval([1.1] * 5) == (1.1, 1.1)
    assert compare.median_interval([0.9]) == (0.9, 0.9)
    few = [0.85, 0.95, 1.0, 1.05, 1.27]
    low, high = compare.median_interval(few)
    assert min(few) <= low <= statistics.median(few) <= high <= max(few)
    assert compare.median_interval(few) == (low, high)  # the same rounds print the same interval
    # the same spread over three times the rounds: a narrower interval, still around the median
    many_low, many_high = compare.median_interval(few * 3)
    assert low <= many_low <= 1.0 <= many_high <= high
    assert many_high - many_low < high - low
    # rounds that all favour one side exclude 1.0
    assert compare.median_interval([1.08, 1.1, 1.12, 1.15, 1.2, 1.09])[0] > 1.0


def test_machine_probe_measures_the_work_it_is_given():
    small = compare.machine_probe(work=100, handoffs=50, sleeps=3)
    large = compare.machine_probe(work=800, handoffs=50, sleeps=3)
    assert 0 < small["python_ms"] < large["python_ms"]
    assert small["handoff_us"] > 0 and large["handoff_us"] > 0
    assert small["oversleep_us"] >= 0 and large["oversleep_us"] >= 0  # time.sleep never returns early


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU time is read from /proc")
@pytest.mark.timeout(240)
def test_rounds_start_one_system_later_each_time_and_report_steal(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/compare.py", "--systems", "sync_worker", "--workers", "1,2",
                          "--cases", "drain", "--rounds", "3", "--runs", "60", "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = re.findall(r"round (\d) (sync_worker\S*): drain [\d,]+/s cpu [\d.]+ms steal \d+% \(\d+s; machine: "
                        r"probe \d+ ms CPU, hand-off \d+ µs, oversleep \d+ µs\)", out.stderr)
    assert trials == [("1", "sync_worker"), ("1", "sync_worker*2"),
                      ("2", "sync_worker*2"), ("2", "sync_worker"),
                      ("3", "sync_worker"), ("3", "sync_worker*2")], out.stderr
    assert "3 interleaved rounds (each starting one system later)" in out.stdout
    assert re.search(r"steal, per cent of this machine's CPU time, every trial and case\): [\d.]+ \(", out.stdout)
    assert re.search(r"one worker ÷ 2 workers, same round, 3 rounds, bootstrap: drain [\d.]+× "
                     r"\(90 % interval of the median [\d.]+–[\d.]+\); runs the later workers got in the drain "
                     r"\d+ \(\d+–\d+\) of 60 ", out.stdout), out.stdout
    assert re.search(r"the machine of the moment, .*: a fixed Python \+ SQLite workload [\d.]+ \([\d.]+–[\d.]+\) ms "
                     r"of CPU, a thread waking another \d+ \(\d+–\d+\) µs, a 2 ms sleep overshooting by \d+ ", out.stdout)
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(row["round"], row["system"]) for row in rows] == [(int(n), system) for n, system in trials]
    # with two workers, the runs each one got in the case (all of them, between the two)
    assert [sum(row["drain"]["delivered"]) for row in rows if row["system"] == "sync_worker*2"] == [60, 60, 60]
    assert all("delivered" not in row["drain"] for row in rows if row["system"] == "sync_worker")
    assert all(0 <= row["drain"]["steal_pct"] <= 100 for row in rows)
    assert all(row["machine"]["python_ms"] > 0 for row in rows)


def _row(system: str, rnd: int, rate: float, cpu: float) -> dict:
    return {"system": system, "round": rnd, "drain": {"runs_per_s": rate, "cpu_ms": {"total": cpu}}}


def test_a_baseline_tree_is_compared_per_round_at_each_worker_count():
    """``--baseline-src`` with ``--workers``: the baseline tree runs with K workers too, and the
    summary gives this tree ÷ the baseline per round for each K, and one ÷ K workers within
    each tree (not this tree's one worker ÷ the baseline's K)."""
    results = []
    for rnd in (1, 2, 3):
        results += [_row("sync_worker", rnd, 1000, 0.40), _row("sync_worker@base", rnd, 1000, 0.40),
                    _row("sync_worker*2", rnd, 1000, 0.40), _row("sync_worker@base*2", rnd, 800, 0.50)]
    results.append({"system": "sync_worker@base*2", "round": 4, "error": "boom"})  # a failed trial: left out
    args = type("Args", (), {"cases": ["drain"]})()
    lines = compare._against_baseline(results, args)
    assert lines == [
        "- this tree ÷ the baseline tree, 1 worker(s), same round, 3 rounds (runs/s with the 90 % bootstrap "
        "interval of the median; CPU per run): drain 1.00× (1.00–1.00), CPU per run 1.00×",
        "- this tree ÷ the baseline tree, 2 worker(s), same round, 3 rounds (runs/s with the 90 % bootstrap "
        "interval of the median; CPU per run): drain 1.25× (1.25–1.25), CPU per run 0.80×",
    ]
    summary = {system: {"rounds": 3, "drain": {"runs_per_s": [1000.0]}, "worker_rss_mb": [1.0]}
               for system in ("sync_worker@base*2", "sync_worker*2")}
    text = "\n".join(compare.extra_lines(summary, results, type("Args", (), {"cases": ["drain"]})(), 1.0))
    assert "one worker ÷ 2 workers (baseline tree), same round, 3 rounds, bootstrap: drain 1.25×" in text
    assert "one worker ÷ 2 workers, same round, 3 rounds, bootstrap: drain 1.00×" in text
    assert compare.label("sync_worker@base*2", {}) == "sync_worker, baseline tree, 2 worker processes"
