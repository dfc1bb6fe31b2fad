"""What every benchmark command records about where it ran, and how it guards against the
shared broker: ``run.py`` (workloads) and ``curves.py`` (cost curves) use the same pieces.

- :func:`machine`: the machine, the library versions, the broker, which banyan_bus ran;
- :func:`banyan_snapshot`: banyan_bus as committed at a git ref (``--banyan-ref``),
  extracted to a temporary folder the measured processes put first on their path;
- :class:`BrokerWatch`: the broker's ports (and, if asked, its alarms) probed every second:
  other suites on this machine stop, restart and alarm the shared broker, and a
  measurement that overlapped that measured nothing valid;
- :func:`broker_trouble`: whether an exception says the broker was unreachable or went
  away (measured again), as opposed to a wrong result (never retried).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import vhosts

ROOT = Path(__file__).resolve().parent.parent
_TROUBLE_NAMES = {
    "BrokerUnreachable",
    "AMQPConnectionError",
    "ConnectionClosed",
    "BrokerAdminError",
}


def machine(packages: tuple[str, ...]) -> dict[str, Any]:
    """CPUs, Python, platform, load, the versions of ``packages``, RabbitMQ and Erlang,
    and the banyan_bus commit of this checkout with its uncommitted files."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }
    for pkg in packages:
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    try:
        overview = vhosts.broker_overview()
        info["rabbitmq"] = overview.get("rabbitmq_version")
        info["erlang"] = overview.get("erlang_version")
    except RuntimeError as exc:  # BrokerAdminError is one
        info["rabbitmq"] = f"unknown ({exc})"
    git = ["git", "-C", str(ROOT)]
    try:
        info["banyan_commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "banyan_bus"], capture_output=True, text=True
        ).stdout.splitlines()
        info["banyan_uncommitted"] = [ln[3:] for ln in dirty if ln.strip()]
    except (OSError, subprocess.CalledProcessError):
        info["banyan_commit"] = None
    return info


def banyan_snapshot(ref: str) -> tuple[tempfile.TemporaryDirectory[str], str]:
    """``banyan_bus/`` as committed at ``ref``, extracted to a temporary folder (put it
    first on the measured processes' path: ``BENCH_BANYAN_SRC``); and ref's short sha.
    The caller cleans the folder up."""
    git = ["git", "-C", str(ROOT)]
    sha = subprocess.run(
        [*git, "rev-parse", "--short", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    snapshot = tempfile.TemporaryDirectory(prefix="banyan-ref-")
    archive = subprocess.run(
        [*git, "archive", sha, "banyan_bus"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", snapshot.name], input=archive, check=True)
    return snapshot, sha


def broker_trouble(exc: BaseException, *, timeouts: bool = True) -> bool:
    """True if ``exc`` (or its cause) says the broker was unreachable or went away: what
    was measured is not valid and is measured again. Wrong results are assertion errors
    and never count as this. ``timeouts``: a ``TimeoutError`` counts too (a connection
    or admin call that timed out; not where a timeout means a lost message)."""
    kinds: tuple[type[BaseException], ...] = (
        (ConnectionError, TimeoutError) if timeouts else (ConnectionError,)
    )
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds) or type(seen).__name__ in _TROUBLE_NAMES:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class BrokerWatch(threading.Thread):
    """Probes the broker's AMQP and management ports every second (and, with
    ``alarms``, its memory and disk alarms, which block publishers and new connections:
    as good as an outage for a measurement), and remembers when it found trouble."""

    def __init__(self, *, alarms: bool = False, margin: float = 0.0) -> None:
        super().__init__(daemon=True, name="broker-watch")
        amqp = urlsplit(vhosts.amqp_base_url())
        mgmt = urlsplit(vhosts.management_url())
        self.targets = [
            (amqp.hostname or "127.0.0.1", amqp.port or 5672),
            (mgmt.hostname or "127.0.0.1", mgmt.port or 15672),
        ]
        self.alarms = alarms
        self.margin = margin  # how long before a window an outage still counts (s)
        self.outages: list[float] = []
        self._lock = threading.Lock()

    def up(self) -> bool:
        for target in self.targets:
            try:
                socket.create_connection(target, timeout=5).close()
            except OSError:
                return False
        return True

    def alarmed(self) -> bool:
        try:
            nodes = vhosts._request(
                "GET", "/api/nodes?columns=mem_alarm,disk_free_alarm", timeout=10
            )
        except vhosts.BrokerAdminError:
            return True
        if not isinstance(nodes, list):  # a node still starting answers oddly
            return True
        return any(
            n.get("mem_alarm") or n.get("disk_free_alarm") for n in nodes if isinstance(n, dict)
        )

    def troubled(self) -> bool:
        return not self.up() or (self.alarms and self.alarmed())

    def run(self) -> None:
        while True:
            try:
                trouble = self.troubled()
            except Exception:  # whatever the broker answers, the watch goes on
                trouble = True
            if trouble:
                self.outages.append(time.monotonic())
            time.sleep(1.0)

    def ensure_started(self) -> None:
        with self._lock:
            if not self.is_alive():
                self.start()

    def outage_between(self, t0: float, t1: float) -> bool:
        return any(t0 - self.margin <= t <= t1 + 1.0 for t in self.outages)

    def wait_answering(self, limit: float = 180) -> None:
        """Until the management API answers (at most ``limit`` seconds)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                vhosts.broker_overview()
                return
            except vhosts.BrokerAdminError:
                time.sleep(2)

    def wait_settled(self, limit: float = 180, settle: float = 20) -> None:
        """Until the broker answers, untroubled, and has been so for ``settle`` seconds
        (just after a restart its quorum queues are still recovering)."""
        self.ensure_started()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            since = time.monotonic() - max(self.outages, default=-1e9)
            if since < settle:
                time.sleep(settle - since)
                continue
            if not self.troubled():
                return
            self.outages.append(time.monotonic())
            time.sleep(2)
