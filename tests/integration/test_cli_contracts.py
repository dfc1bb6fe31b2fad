"""``banyan contracts snapshot|check`` as CI runs it: subprocesses on a service module
that changes between a release and a pull request (no broker needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

RELEASED = """
from banyan_bus import Event, MessageBus

class GateMemberJoined(Event):
    member_id: str
    email: str
    age: int

bus = MessageBus("gate-service", "memory://")
"""

ADDITIVE = """
from banyan_bus import Event, MessageBus

class GateMemberJoined(Event):
    member_id: str
    email: str
    age: int
    referrer: str | None = None

class GateMemberJoinedV2(Event, name="GateMemberJoined", version=2):
    member_id: str

bus = MessageBus("gate-service", "memory://")
"""

BREAKING = """
from banyan_bus import Event, MessageBus

class GateMemberJoined(Event):
    member_id: str
    age: str
    phone: str

bus = MessageBus("gate-service", "memory://")
"""

RENAMED = """
from banyan_bus import Event, MessageBus

class GateMemberSignedUp(Event):
    member_id: str
    email: str
    age: int

bus = MessageBus("gate-service", "memory://")
"""


def banyan(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("banyan")
    assert path, "the `banyan` script is not installed: run `pip install -e .[dev]`"
    return subprocess.run(
        [path, *args],
        cwd=cwd,
        env={**os.environ, "BANYAN_URL": "memory://"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def release(tmp_path: Path) -> Path:
    """The service as released, its snapshot written by the CLI."""
    (tmp_path / "gate_service.py").write_text(RELEASED)
    result = banyan(tmp_path, "contracts", "snapshot", "gate_service:bus")
    assert result.returncode == 0, result.stderr
    assert "wrote 1 contract version(s) to contracts.snapshot.json" in result.stdout
    snapshot = tmp_path / "contracts.snapshot.json"
    [entry] = json.loads(snapshot.read_text())["contracts"]
    assert (entry["type"], entry["version"]) == ("GateMemberJoined", 1)
    assert set(entry["schema"]["properties"]) == {"memberId", "email", "age"}
    return snapshot


def test_unchanged_and_additive_contracts_pass(tmp_path: Path) -> None:
    release(tmp_path)
    same = banyan(tmp_path, "contracts", "check", "gate_service:bus")
    assert same.returncode == 0, same.stderr
    assert same.stdout.strip() == "compatible with contracts.snapshot.json"

    (tmp_path / "gate_service.py").write_text(ADDITIVE)
    grown = banyan(tmp_path, "contracts", "check", "gate_service:bus")
    assert grown.returncode == 0, grown.stderr
    assert grown.stdout.splitlines() == [
        "added: GateMemberJoined v1: new optional field 'referrer'",
        "added: new version GateMemberJoined v2",
        "compatible with contracts.snapshot.json",
    ]


def test_a_breaking_change_exits_1_with_one_line_per_problem(tmp_path: Path) -> None:
    snapshot = release(tmp_path)
    moved = tmp_path / "ci" / "released.json"
    moved.parent.mkdir()
    snapshot.rename(moved)
    (tmp_path / "gate_service.py").write_text(BREAKING)
    result = banyan(
        tmp_path, "contracts", "check", "--snapshot", "ci/released.json", "gate_service:bus"
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "breaking: GateMemberJoined v1: retyped field 'age': integer → string",
        "breaking: GateMemberJoined v1: removed field 'email'",
        "breaking: GateMemberJoined v1: newly required field 'phone'",
    ]
    assert "3 breaking change(s) against ci/released.json" in result.stderr


def test_a_renamed_type_is_breaking(tmp_path: Path) -> None:
    release(tmp_path)
    (tmp_path / "gate_service.py").write_text(RENAMED)
    result = banyan(tmp_path, "contracts", "check", "gate_service:bus")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(
        "breaking: GateMemberJoined: the type is gone (renamed or removed)"
    )
    assert "added: new type GateMemberSignedUp (v1)" in result.stdout


def test_a_missing_snapshot_says_how_to_write_one(tmp_path: Path) -> None:
    (tmp_path / "gate_service.py").write_text(RELEASED)
    result = banyan(tmp_path, "contracts", "check", "gate_service:bus")
    assert result.returncode == 2
    assert "no snapshot at contracts.snapshot.json" in result.stderr
    assert "banyan contracts snapshot gate_service:bus" in result.stderr
