"""``banyan publish`` sends the contract's default version (the pinned one, else v1), not
blindly the latest, and says on stderr which one it sent (subprocesses, RabbitMQ)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SERVICE = """
from banyan_bus import Event, MessageBus

class KioskOpened(Event):
    kiosk_id: str

class KioskOpenedV2(Event, name="KioskOpened", version=2):
    kiosk_id: str
    city: str

bus = MessageBus("kiosk-service")  # on BANYAN_URL
pinned = MessageBus("kiosk-service", publish_versions={"KioskOpened": 2})
"""


def publish(cwd: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("banyan")
    assert path, "the `banyan` script is not installed: run `pip install -e .[dev]`"
    return subprocess.run(
        [path, "publish", *args],
        cwd=cwd,
        env={**os.environ, "BANYAN_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_version_publish_sends_v1_and_says_so(tmp_path: Path, amqp_url: str) -> None:
    (tmp_path / "kiosks.py").write_text(SERVICE)
    result = publish(tmp_path, amqp_url, "kiosks:bus", "KioskOpened", '{"kioskId": "k1"}')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("evt_")
    assert (
        "sent KioskOpened v1 (the contract's default; the latest is v2 (--version 2))"
        in result.stderr
    )


def test_version_overrides_and_a_pinned_service_sends_its_pin(
    tmp_path: Path, amqp_url: str
) -> None:
    (tmp_path / "kiosks.py").write_text(SERVICE)
    chosen = publish(
        tmp_path,
        amqp_url,
        "kiosks:bus",
        "KioskOpened",
        '{"kioskId": "k1", "city": "Oslo"}',
        "--version",
        "2",
    )
    assert chosen.returncode == 0, chosen.stderr
    assert "sent KioskOpened v2 (as --version said)" in chosen.stderr
    pinned = publish(
        tmp_path, amqp_url, "kiosks:pinned", "KioskOpened", '{"kioskId": "k1", "city": "Oslo"}'
    )
    assert pinned.returncode == 0, pinned.stderr
    assert "sent KioskOpened v2 (the version the service pins)" in pinned.stderr
    wrong = publish(tmp_path, amqp_url, "kiosks:pinned", "KioskOpened", '{"kioskId": "k1"}')
    assert wrong.returncode == 2
    assert "payload does not fit KioskOpened v2: city: Field required" in wrong.stderr
