"""A 3-node RabbitMQ cluster on this machine (nodes c1/c2/c3@localhost, ports 5701-5703).

Follows /work/shared/RABBITMQ-NOTES.md: each node runs as the ``rabbitmq`` user (sharing its
Erlang cookie), with its own AMQP port, distribution port and data directory under
``/tmp/rmqc``; c2 and c3 join c1. :func:`stop_cluster` stops only the nodes this process
started and removes ``/tmp/rmqc``. Any step that fails raises :class:`ClusterError`: the
cluster scenario fails loudly, it is never skipped.

Faults the scenarios inject through :class:`Cluster`: ``kill`` (SIGKILL of a node's VM,
only a pid this run's node owns) and ``restart``; ``partition``/``heal`` (one node cut off
from the others at the Erlang distribution layer, see :meth:`Cluster.partition`);
``make_whole`` brings every node back before a scenario declares its queues.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

BASE = Path("/tmp/rmqc")
LOCK = Path("/tmp/rmqc.lock")  # one cluster per machine: a second run waits for the first
LOCK_WAIT = 240.0
NODES = {"c1": (5701, 25701), "c2": (5702, 25702), "c3": (5703, 25703)}
CTL_TIMEOUT = 120.0
#: The cookie a partitioned node uses towards its peers (any value but the real one).
BOGUS_COOKIE = "banyan_partitioned"


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


def await_node(short: str, within: float = 150.0) -> None:
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
    partitioned: set[str] = field(default_factory=set)  # cut off by partition(), not healed

    def leader_of(self, queue: str, *, ask: str = "c1") -> str:
        """The node (``cN@localhost``) leading quorum queue ``queue``."""
        out = ctl(node_name(ask), "list_queues", "-q", "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == queue:
                return parts[1]
        raise ClusterError(f"queue {queue!r} not listed by {ask}: {out[-600:]}")

    def members_of(self, queue: str, *, ask: str = "c1") -> tuple[list[str], list[str]]:
        """Quorum queue ``queue``'s members and those of them online."""
        out = ctl(node_name(ask), "list_queues", "--formatter", "json", "name", "members", "online")
        for row in json.loads(out):
            if row.get("name") == queue:
                return list(row.get("members") or []), list(row.get("online") or [])
        raise ClusterError(f"queue {queue!r} not listed by {ask}: {out[-600:]}")

    def pid(self, short: str) -> int:
        """The OS pid of ``short``'s VM (``beam.smp``), checked to be this run's node."""
        if short not in self.started:
            raise ClusterError(f"{short} was not started by this run: its pid is not ours")
        out = ctl(node_name(short), "eval", "os:getpid().", timeout=30).strip().strip('"')
        try:
            pid = int(out)
        except ValueError:
            raise ClusterError(f"{short}: os:getpid() answered {out!r}") from None
        if not _is_our_node(short, pid):
            raise ClusterError(f"pid {pid} (from {short}) is not {short} of /tmp/rmqc")
        return pid

    def kill(self, short: str) -> tuple[int, float]:
        """SIGKILL ``short``'s VM; ``(pid, wall-clock time of the kill)`` once it is gone."""
        pid = self.pid(short)
        os.kill(pid, signal.SIGKILL)
        at = time.time()
        deadline = time.monotonic() + 15.0
        while _alive(pid) or _port_open(NODES[short][1]):
            if time.monotonic() > deadline:
                raise ClusterError(f"{short} (pid {pid}) still there 15 s after SIGKILL")
            time.sleep(0.05)
        return pid, at

    def restart(self, short: str, *, within: float = 90.0) -> None:
        """Start ``short`` again on its data directory and wait until every other node
        lists it as running (it rejoined the cluster)."""
        start_node(short)
        await_node(short, within=within)
        self.await_whole(within=within)

    def running(self, short: str) -> bool:
        """Whether ``short``'s broker (the rabbit application) runs; False if the VM is down."""
        try:
            out = ctl(node_name(short), "eval", "rabbit:is_running().", timeout=30)
        except ClusterError:
            return False
        return out.strip() == "true"

    def running_nodes(self, ask: str) -> list[str]:
        """``ask``'s cluster_status ``running_nodes`` (``cN@localhost``)."""
        out = ctl(node_name(ask), "cluster_status", "--formatter", "json", timeout=30)
        return sorted(json.loads(out).get("running_nodes") or [])

    def await_whole(self, *, within: float = 90.0) -> None:
        """Wait until every node's broker runs and each lists all of them as running."""
        everyone = sorted(node_name(s) for s in self.started)
        deadline = time.monotonic() + within
        seen: dict[str, object] = {}
        while True:
            try:
                seen = {s: self.running_nodes(s) for s in self.started}
                if all(v == everyone for v in seen.values()):
                    return
            except ClusterError as exc:
                seen = {"error": str(exc)[-300:]}
            if time.monotonic() > deadline:
                raise ClusterError(f"the cluster was not whole within {within:.0f} s: {seen}")
            time.sleep(0.5)

    def make_whole(self) -> None:
        """Bring back what an earlier scenario left down (a VM killed, an app stopped, a
        partition), then wait until the cluster is whole: a scenario declares its quorum
        queues on all three nodes."""
        paused = set(self.partitioned)
        for short in paused:
            self.heal(short)  # pause_minority then starts its broker again by itself
        for short in self.started:
            if not _port_open(NODES[short][1]):
                start_node(short)
                await_node(short)
            elif short not in paused and not self.running(short):
                ctl(node_name(short), "start_app")
        self.await_whole()

    def partition(self, victim: str) -> float:
        """Cut ``victim`` off from the other nodes, both ways, at the Erlang distribution
        layer (no firewall here): on the victim, the cookie it uses towards each peer is set
        to a wrong one and the connection to it dropped, so every reconnection either side
        tries fails the handshake (the peers log "Connection attempt ... rejected. Invalid
        challenge reply"), while rabbitmqctl (a hidden node of its own, with the real
        cookie) still reaches the victim to :meth:`heal` it. The AMQP listeners are
        untouched: clients see what the broker does about the partition.

        A refused partition (as a firewall's REJECT), not a silent one (DROP): both sides
        see the node go down at once, where lost packets are noticed only after
        net_ticktime (60 s by default). Returns the wall clock (the victim's: this
        machine's) when the connections were dropped; the CLI takes from 0.4 s to over a
        second to start, so the time before the call is not the cut's."""
        peers = ",".join(f"'{node_name(s)}'" for s in self.started if s != victim)
        self.partitioned.add(victim)
        out = ctl(
            node_name(victim),
            "eval",
            f"[begin erlang:set_cookie(N, '{BOGUS_COOKIE}'), erlang:disconnect_node(N) end"
            f" || N <- [{peers}]], os:system_time(microsecond).",
            timeout=30,
        )
        return _clock(out)

    def heal(self, victim: str) -> float:
        """Undo :meth:`partition`: the real cookie towards each peer again, and a ping each
        (nothing to do if the victim's VM is down: a restarted VM has its real cookie).
        Returns the wall clock of the heal (as :meth:`partition`)."""
        self.partitioned.discard(victim)
        if not _port_open(NODES[victim][1]):
            return time.time()
        peers = ",".join(f"'{node_name(s)}'" for s in self.started if s != victim)
        out = ctl(
            node_name(victim),
            "eval",
            "C = erlang:get_cookie(), [begin erlang:set_cookie(N, C), net_adm:ping(N) end"
            f" || N <- [{peers}]], os:system_time(microsecond).",
            timeout=30,
        )
        return _clock(out)

    def logged_at(self, short: str, text: str, *, after: float) -> float | None:
        """Wall clock of the first line of ``short``'s log containing ``text`` stamped at or
        after ``after`` (the node's own record of when something happened); None if none."""
        for log in sorted((BASE / short / "log").glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if text not in line:
                    continue
                try:
                    stamp = datetime.fromisoformat(line[:32]).timestamp()
                except ValueError:
                    continue
                if stamp >= after:
                    return stamp
        return None

    def reaches(self, ask: str, other: str) -> bool:
        """Whether ``ask`` can connect to ``other`` over Erlang distribution (net_adm:ping)."""
        out = ctl(node_name(ask), "eval", f"net_adm:ping('{node_name(other)}').", timeout=30)
        return out.strip() == "pong"


def _prepare_node(short: str) -> None:
    """A fresh data directory and config file for ``short`` under /tmp/rmqc."""
    port, _ = NODES[short]
    d = BASE / short
    (d / "mnesia").mkdir(parents=True)
    (d / "log").mkdir(parents=True)
    (d / "plugins").write_text("[].\n")
    # /etc/rabbitmq/rabbitmq.conf pins `listeners.tcp.local = 127.0.0.1:5672`, which wins
    # over RABBITMQ_NODE_PORT: each node gets its own config file. pause_minority is the
    # partition handling RabbitMQ recommends for production clusters of 3 or more nodes: a
    # node that sees no majority stops its broker (closing its clients' connections) until
    # it does again, so no minority goes on alone.
    (d / "rabbitmq.conf").write_text(
        f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"
        "cluster_partition_handling = pause_minority\n"
    )


def start_node(short: str) -> None:
    """Launch ``short``'s VM (``rabbitmq-server -detached``, as the rabbitmq user) on its data
    directory: a first start (after :func:`_prepare_node`) or a restart that rejoins the
    cluster. Returns once the launcher did; :func:`await_node` waits for the broker."""
    port, dist = NODES[short]
    d = BASE / short
    env = (
        f"RABBITMQ_NODENAME={node_name(short)} RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 "
        f"RABBITMQ_NODE_PORT={port} RABBITMQ_DIST_PORT={dist} "
        f"RABBITMQ_MNESIA_BASE={d}/mnesia RABBITMQ_LOG_BASE={d}/log "
        f"RABBITMQ_PID_FILE={d}/pid RABBITMQ_ENABLED_PLUGINS_FILE={d}/plugins "
        f"RABBITMQ_CONFIG_FILE={d}/rabbitmq.conf"
    )
    cmd = f"cd /var/lib/rabbitmq && env {env} /usr/lib/rabbitmq/bin/rabbitmq-server -detached"
    proc = subprocess.run(
        ["su", "rabbitmq", "-s", "/bin/sh", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise ClusterError(f"starting {short} failed ({proc.returncode}): {proc.stderr[-800:]}")


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
        for short in NODES:
            _prepare_node(short)
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(BASE)], check=True)
        for short in NODES:
            start_node(short)
            cluster.started.append(short)
        for short in NODES:
            await_node(short)
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


def stop_cluster(cluster: Cluster, *, keep_logs: Path | None = None) -> list[str]:
    """Stop the nodes this process started (only those) and remove /tmp/rmqc; problems seen.

    Each node's VM is the one running now (after a kill and restart, the new pid: its pid
    file is rewritten at boot, and a pid is only ever signalled after checking it is that
    node's): ``rabbitmqctl stop``, then wait for the VM to end; SIGKILL if it does not. A
    node whose VM is already gone (killed and not restarted) is not a problem. ``keep_logs``:
    a directory to copy the nodes' logs to first (replaced)."""
    problems: list[str] = []
    for short in reversed(cluster.started):
        pid = _our_pid(short)
        try:
            ctl(node_name(short), "stop", timeout=90)
        except ClusterError as exc:
            if pid is not None or _port_open(NODES[short][1]):
                problems.append(str(exc))
        if pid is not None:
            deadline = time.monotonic() + 20.0
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid) and _is_our_node(short, pid):
                problems.append(f"{short} (pid {pid}) still running 20 s after stop: SIGKILL")
                os.kill(pid, signal.SIGKILL)
    cluster.started.clear()
    if keep_logs is not None:
        shutil.rmtree(keep_logs, ignore_errors=True)
        for log in sorted(BASE.glob("*/log")):
            shutil.copytree(log, keep_logs / log.parent.name)
    shutil.rmtree(BASE, ignore_errors=True)
    _unlock(cluster)
    return problems


def _clock(out: str) -> float:
    """``os:system_time(microsecond)`` as printed by ``rabbitmqctl eval``, in seconds."""
    try:
        return int(out.strip()) / 1e6
    except ValueError:
        raise ClusterError(f"expected a node's clock, got {out.strip()[-300:]!r}") from None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_our_node(short: str, pid: int) -> bool:
    """Whether ``pid`` is the VM of ``short`` started from /tmp/rmqc (its environment names
    both), never the machine's own broker or a recycled pid."""
    try:
        env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return False
    return {
        f"RABBITMQ_NODENAME={node_name(short)}".encode(),
        f"RABBITMQ_MNESIA_BASE={BASE / short}/mnesia".encode(),
    } <= env


def _our_pid(short: str) -> int | None:
    """``short``'s running VM from its pid file, if it is ours and alive."""
    try:
        pid = int((BASE / short / "pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _is_our_node(short, pid) else None


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
