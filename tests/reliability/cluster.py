"""A 3-node RabbitMQ cluster on this machine (nodes c1/c2/c3@localhost, ports 5701-5703).

Follows /work/shared/RABBITMQ-NOTES.md: each node runs as the ``rabbitmq`` user (sharing its
Erlang cookie), with its own AMQP port, distribution port and data directory under
``/tmp/rmqc``; c2 and c3 join c1. :func:`stop_cluster` stops only the nodes this process
started and removes ``/tmp/rmqc``. Any step that fails raises :class:`ClusterError`: the
cluster scenario fails loudly, it is never skipped.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE = Path("/tmp/rmqc")
LOCK = Path("/tmp/rmqc.lock")  # one cluster per machine: a second run waits for the first
LOCK_WAIT = 240.0
NODES = {"c1": (5701, 25701), "c2": (5702, 25702), "c3": (5703, 25703)}
CTL_TIMEOUT = 120.0


class ClusterError(RuntimeError):
    """The cluster could not be started or driven."""


def node_name(short: str) -> str:
    return f"{short}@localhost"


def amqp_url(short: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:{NODES[short][0]}/"


def multi_url(order: tuple[str, ...] = ("c1", "c2", "c3")) -> str:
    return ",".join(amqp_url(s) for s in order)


def ctl(node: str, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True) -> str:
    """``rabbitmqctl -n node args...``; its stdout (raises ClusterError on failure if check)."""
    cmd = ["rabbitmqctl", "-n", node, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        raise ClusterError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
            f" {proc.stdout.strip()[-400:]}"
        )
    return proc.stdout


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _await_node(short: str, within: float = 150.0) -> None:
    """Wait until ``short`` is up (``await_startup`` fails at once while the VM is booting)."""
    deadline = time.monotonic() + within
    while True:
        try:
            ctl(node_name(short), "await_startup", "--timeout", "60", timeout=90)
            return
        except ClusterError as exc:
            if time.monotonic() > deadline:
                log = BASE / short / "log"
                tail = ""
                for f in sorted(log.glob("*.log")):
                    tail += f"{f.name}: {f.read_text(errors='replace')[-600:]}\n"
                raise ClusterError(
                    f"{short} did not start within {within:.0f} s: {exc}; {tail}"
                ) from exc
            time.sleep(1.0)


@dataclass
class Cluster:
    started: list[str] = field(default_factory=list)
    startup_seconds: float = 0.0
    lock_fd: int | None = None

    def leader_of(self, queue: str, *, ask: str = "c1") -> str:
        """The node (``cN@localhost``) leading quorum queue ``queue``."""
        out = ctl(node_name(ask), "list_queues", "-q", "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == queue:
                return parts[1]
        raise ClusterError(f"queue {queue!r} not listed by {ask}: {out[-600:]}")


def start_cluster() -> Cluster:
    """Start c1, c2, c3 and join c2/c3 to c1. Stops what it started if a step fails."""
    cluster = Cluster()
    began = time.monotonic()
    cluster.lock_fd = _lock()
    for short, (port, dist) in NODES.items():
        if _port_open(port) or _port_open(dist):
            _unlock(cluster)
            raise ClusterError(
                f"port {port} or {dist} is already in use: another {short} node is running "
                "(not started by this test run, so it is left alone); stop it and rerun"
            )
    shutil.rmtree(BASE, ignore_errors=True)
    try:
        for short, (port, dist) in NODES.items():
            d = BASE / short
            (d / "mnesia").mkdir(parents=True)
            (d / "log").mkdir(parents=True)
            (d / "plugins").write_text("[].\n")
            # /etc/rabbitmq/rabbitmq.conf pins `listeners.tcp.local = 127.0.0.1:5672`, which
            # wins over RABBITMQ_NODE_PORT: each node gets its own config file.
            (d / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"
            )
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(BASE)], check=True)
            env = (
                f"RABBITMQ_NODENAME={node_name(short)} RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 "
                f"RABBITMQ_NODE_PORT={port} RABBITMQ_DIST_PORT={dist} "
                f"RABBITMQ_MNESIA_BASE={d}/mnesia RABBITMQ_LOG_BASE={d}/log "
                f"RABBITMQ_PID_FILE={d}/pid RABBITMQ_ENABLED_PLUGINS_FILE={d}/plugins "
                f"RABBITMQ_CONFIG_FILE={d}/rabbitmq.conf"
            )
            cmd = (
                f"cd /var/lib/rabbitmq && env {env} /usr/lib/rabbitmq/bin/rabbitmq-server -detached"
            )
            proc = subprocess.run(
                ["su", "rabbitmq", "-s", "/bin/sh", "-c", cmd],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if proc.returncode != 0:
                raise ClusterError(
                    f"starting {short} failed ({proc.returncode}): {proc.stderr[-800:]}"
                )
            cluster.started.append(short)
        for short in NODES:
            _await_node(short)
        for short in ("c2", "c3"):
            ctl(node_name(short), "stop_app")
            ctl(node_name(short), "join_cluster", node_name("c1"))
            ctl(node_name(short), "start_app")
        ctl(node_name("c1"), "await_startup", timeout=150)
        status = ctl(node_name("c1"), "cluster_status", "--formatter", "json")
        for short in NODES:
            if node_name(short) not in status:
                raise ClusterError(f"{short} is not in c1's cluster_status: {status[-800:]}")
    except BaseException:
        stop_cluster(cluster)
        raise
    cluster.startup_seconds = time.monotonic() - began
    return cluster


def stop_cluster(cluster: Cluster) -> list[str]:
    """Stop the nodes this process started (only those) and remove /tmp/rmqc; problems seen."""
    problems: list[str] = []
    for short in reversed(cluster.started):
        try:
            ctl(node_name(short), "stop", timeout=90)
        except ClusterError as exc:
            problems.append(str(exc))
            pid_file = BASE / short / "pid"
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            subprocess.run(["kill", "-9", str(pid)], check=False)
    cluster.started.clear()
    shutil.rmtree(BASE, ignore_errors=True)
    _unlock(cluster)
    return problems


def _lock() -> int:
    """Hold /tmp/rmqc.lock while our cluster lives (another run of the suite on this machine
    waits up to LOCK_WAIT s, then fails loudly, instead of sharing ports and /tmp/rmqc)."""
    fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise ClusterError(
                    f"another test run holds {LOCK} (its 3-node cluster) for over {LOCK_WAIT:.0f} s"
                ) from None
            time.sleep(1.0)


def _unlock(cluster: Cluster) -> None:
    if cluster.lock_fd is not None:
        fcntl.flock(cluster.lock_fd, fcntl.LOCK_UN)
        os.close(cluster.lock_fd)
        cluster.lock_fd = None
