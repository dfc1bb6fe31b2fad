"""The benchmark harness runs, against the real broker, and every run passes its own checks.

``benchmarks/run.py --quick`` runs every workload for raw aiormq, raw aio-pika, FastStream
and banyan_bus once, with small N, each in a fresh process on a vhost of its own, and the
memory section (RSS per in-flight message and per idle subscription, aiormq and banyan);
every run verifies itself (each message published or handled exactly once, queues empty,
nothing dead-lettered; every idle subscription handles its check message once) and a
wrong run makes ``run.py`` exit 1. Nothing here asserts a speed or a size: figures from a
shared machine belong in ``benchmarks/README.md``, measured as ratios in one run, never in
a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


@pytest.mark.timeout(900)
def test_every_workload_runs_and_checks_itself(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--rounds", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert runs
    assert all(run["ok"] for run in runs), [r for r in runs if not r["ok"]]
    seen = {(run["workload"], run["impl"]) for run in runs}
    for workload in (
        "1-publish-seq",
        "2-publish-pipe",
        "3-consume-p100",
        "3-consume-p1000",
        "4-latency",
        "5-io",
    ):
        assert {(workload, impl) for impl in ("aiormq", "raw", "faststream", "banyan")} <= seen
    assert {("6-workers", "w1"), ("6-workers", "w2"), ("6-workers-cpu", "w2")} <= seen
    memory = ("memory-inflight-1k", "memory-inflight-256k", "memory-idle")
    assert {(workload, impl) for workload in memory for impl in ("aiormq", "banyan")} <= seen
    for row in report["summary"]:
        assert row["failed"] == 0, row
        if row["kind"] == "memory":
            assert row["runs"] == 1, row
            assert row["count"] > 0, row
            assert isinstance(row["kib_per_unit"], float), row
            assert "delta_aiormq_kib" in row, row  # compared with the floor
            continue
        assert row["rate"] > 0, row
        assert row["cpu_us_per_msg"] > 0, row
        if row["kind"] != "scaling":
            assert row["ratio_aiormq"] > 0, row
            assert row["cpu_ratio_aiormq"] > 0, row


def test_the_micro_benchmark_counts_every_message() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "micro.py"), "--n", "300", "--rounds", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["consume", "raw"],
        ["consume", "banyan"],
        ["publish", "raw"],
        ["publish", "banyan"],
    ]
