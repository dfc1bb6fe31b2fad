"""The cost curves run against the real broker, every point passes its own checks, and
every plot is drawn.

``benchmarks/curves.py --quick`` measures every curve with small N, each point on a
vhost of its own; every point verifies itself (each message id published once, handled
exactly once per group, per-key order kept, nothing dead-lettered or left behind) and
a failed point makes ``curves.py`` exit 1. Its JSON and PNGs go to a temporary folder,
never to ``benchmarks/results``. Nothing here asserts a speed: the figures belong in
``benchmarks/README.md``, from a full run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
CURVES = ("fanout", "payload", "delays", "ordered", "subscriptions")


@pytest.mark.timeout(900)
def test_every_curve_runs_checks_itself_and_draws_its_plots(tmp_path: Path) -> None:
    out = tmp_path / "curves"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "curves.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "curves.json").read_text())
    assert report["quick"] is True
    assert report["failed"] == {}
    expected = set(CURVES)
    assert expected <= set(report["curves"]), sorted(report["curves"])
    for key in expected:
        curve = report["curves"][key]
        assert curve["ok"] is True, curve.get("error")
        assert curve["rows"], key
        assert all(row["ok"] for row in curve["rows"]), [r for r in curve["rows"] if not r["ok"]]
        assert all(curve["x"] in row for row in curve["rows"]), key
        assert curve["plots"], key
        for plot in curve["plots"]:
            png = out / f"curve-{key}-{plot['y']}.png"
            assert png.exists(), png
            assert png.stat().st_size > 1000, png
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert any(isinstance(row.get(plot["y"]), (int, float)) for row in curve["rows"])
    # every point's vhost is gone: nothing (the hour-long delayed messages above all) lingers
    assert report["vhosts"]
    assert not set(report["vhosts"]) & _vhosts_now()


def _vhosts_now() -> set[str]:
    sys.path.insert(0, str(BENCH))
    try:
        import vhosts
    finally:
        sys.path.remove(str(BENCH))
    return {v["name"] for v in vhosts._request("GET", "/api/vhosts") or []}
