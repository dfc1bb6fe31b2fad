"""The one-process demos say where they run: on memory://, whatever BANYAN_URL says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("story", ["signup", "orders"])
def test_a_demo_says_it_runs_on_memory_and_ignores_banyan_url(story: str) -> None:
    env = {**os.environ, "BANYAN_URL": "amqp://guest:guest@127.0.0.1:1/"}  # never connected
    result = subprocess.run(
        [sys.executable, "-m", f"examples.{story}.all_in_one"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert "running on memory://" in first
    assert "BANYAN_URL is ignored" in first
    assert f"banyan run examples.{story}." in first
