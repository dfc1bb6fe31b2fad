"""Scenario 5: a 3-node RabbitMQ cluster on this machine, three faults of a node mid-stream
while publishing and consuming go on through the other nodes: the node leading the group's
quorum queue stopped (5), its VM SIGKILLed and restarted (5b), one node partitioned from the
other two and healed (5c).

The clients are given every node, comma-separated (how a user runs banyan_bus against a
cluster)::

    MessageBus("svc", "amqp://u:p@node1:5672/,amqp://u:p@node2:5672/,amqp://u:p@node3:5672/")

They connect to the first node that answers and, after losing it, reconnect to the next
ones in turn. The cluster (nodes c1/c2/c3@localhost, ports 5701-5703, with
``cluster_partition_handling = pause_minority``, the setting RabbitMQ recommends for
production clusters of three or more nodes) is started once per run by a module fixture and
stopped (only those nodes) at the end; each scenario first brings back whatever an earlier
one left down. If the cluster cannot be started or driven, the test fails -- it is never
skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from banyan_bus import Event, MessageBus
from banyan_bus.subscription import Subscription
from tests.reliability import cluster as rmq
from tests.reliability.harness import (
    RSS_ROW,
    DupBound,
    PublishStats,
    Recorder,
    ReliabilityTicked,
    analyse,
    assert_outcome,
    common_rows,
    fmt_rss,
    publish_numbered,
    rss_kib,
    verdict,
    wait_all_handled,
    write_results,
)
from tests.reliability.results import REPORTS

pytestmark = [pytest.mark.reliability]


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[rmq.Cluster]:
    started = rmq.start_cluster()  # raises ClusterError (test error, not a skip)
    try:
        yield started
    finally:
        # The nodes' logs stay in the (ignored) reports directory: what a failure needs.
        problems = rmq.stop_cluster(started, keep_logs=REPORTS / "cluster-logs")
        assert not problems, f"stopping the cluster: {problems}"


def connected_node(bus: MessageBus) -> tuple[object, str] | None:
    """``(connection, node)``: the AMQP connection ``bus`` is on now and its node (``cN``);
    None while it is disconnected. A look inside the transport (aio-pika's connection and
    the aiormq one under it), test-only: the bus shows every URL it was given, not the one
    it is on."""
    transport = getattr(bus, "_transport", None)
    robust = getattr(transport, "_connection", None)
    if robust is None:
        raise AssertionError(f"cannot see {bus!r}'s AMQP connection (transport internals moved?)")
    underlay = robust.transport
    if underlay is None or underlay.connection.is_closed:
        return None
    port = underlay.connection.url.port
    node = next((s for s, (amqp, _) in rmq.NODES.items() if amqp == port), f"port {port}")
    return underlay.connection, node


def node_of(bus: MessageBus) -> str:
    now = connected_node(bus)
    return now[1] if now else "(disconnected)"


class ConfirmedOn:
    """The publisher for :func:`publish_numbered`, noting the node each number's confirm
    came through: the connection the bus was on before and after the confirmed publish
    (``"?"`` if it changed in between: the confirm's node is then not known)."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.node: dict[int, str] = {}

    async def publish(self, event: Event, **kwargs: Any) -> None:
        before = connected_node(self.bus)
        await self.bus.publish(event, **kwargs)
        after = connected_node(self.bus)
        same = before is not None and after is not None and before[0] is after[0]
        self.node[cast(ReliabilityTicked, event).n] = after[1] if same and after else "?"


async def start_groups(
    rec: Recorder, groups: list[str], urls: list[str]
) -> tuple[list[MessageBus], list[Subscription]]:
    """One consumer bus per group (``urls[i]``: group i's node list), each recording in
    ``rec``, started (its queue declared through the first node that answers)."""
    buses: list[MessageBus] = []
    subs: list[Subscription] = []
    try:
        for group, url in zip(groups, urls, strict=True):
            bus = MessageBus(group, url, grace_period=2.0)
            buses.append(bus)
            subs.append(await bus.subscribe(ReliabilityTicked, rec.handler(group)))
            await bus.start()
    except BaseException:
        for bus in buses:
            await bus.stop(grace_period=2.0)
        raise
    return buses, subs


async def await_members_online(
    cluster: rmq.Cluster, queue: str, *, ask: str, within: float = 30.0
) -> tuple[list[str], list[str]]:
    """Quorum queue ``queue``'s members and those online, once all are (or at ``within``)."""
    deadline = time.monotonic() + within
    while True:
        members, online = await asyncio.to_thread(cluster.members_of, queue, ask=ask)
        if sorted(members) == sorted(online) or time.monotonic() > deadline:
            return members, online
        await asyncio.sleep(0.5)


@pytest.mark.timeout(360)
async def test_leader_node_stopped_mid_stream(rabbit_cluster: rmq.Cluster, unique) -> None:
    """Duplicates: stopping the leader touches each group's consumer once (its connection,
    or its queue's leader), so at most its 30 unacked deliveries (default prefetch 3 x
    concurrency 10) come back, plus one copy per failed publish attempt."""
    await asyncio.to_thread(rabbit_cluster.make_whole)
    began = time.monotonic()
    rss0 = rss_kib()
    url = rmq.multi_url()
    rec = Recorder(unique("run"))
    groups = [unique("rel-cluster-a"), unique("rel-cluster-b")]
    stats = PublishStats()
    faults: list[float] = []
    leader = ""
    new_leader = ""
    queue_types: list[str] = []
    async with MessageBus(unique("rel-pub"), url, grace_period=2.0) as publisher:
        buses = []
        subs = []
        for group in groups:
            bus = MessageBus(group, url, grace_period=2.0)
            subs.append(await bus.subscribe(ReliabilityTicked, rec.handler(group)))
            await bus.start()
            buses.append(bus)
        try:
            out = await asyncio.to_thread(
                rmq.ctl, rmq.node_name("c1"), "list_queues", "-q", "name", "type"
            )
            queue_types = [
                line.split()[1]
                for line in out.splitlines()
                if line.split() and line.split()[0] == subs[0].queue_name
            ]
            pub = asyncio.create_task(
                publish_numbered(publisher, rec.run, range(1500), stats, rate=100)
            )
            try:
                await asyncio.wait({pub}, timeout=4.0)
                assert not pub.done(), "publisher finished before the node was stopped"
                leader = await asyncio.to_thread(rabbit_cluster.leader_of, subs[0].queue_name)
                faults.append(time.time())
                await asyncio.to_thread(rmq.ctl, leader, "stop_app")
                await asyncio.wait_for(pub, timeout=150)
            finally:
                pub.cancel()
            complete = await wait_all_handled(stats, lambda: rec.handled, groups, timeout=90)
            await asyncio.sleep(1.0)
            survivor = next(f"{s}@localhost" for s in rmq.NODES if f"{s}@localhost" != leader)
            new_leader = await asyncio.to_thread(
                rabbit_cluster.leader_of, subs[0].queue_name, ask=survivor.split("@")[0]
            )
        finally:
            for bus in buses:
                await bus.stop(grace_period=2.0)
    bound = DupBound(in_flight=30, faults=len(faults), publish_retries=stats.retries)
    outcome = analyse(stats, rec.handled, groups=groups, faults=faults, bound=bound)
    problems = [] if complete else ["not all handled within 90 s"]
    if queue_types != ["quorum"]:
        problems.append(f"queue type {queue_types}, expected quorum")
    result = verdict(outcome, problems)
    rows = common_rows(stats, outcome, len(faults), time.monotonic() - began)
    rows["cluster start-up (s)"] = f"{rabbit_cluster.startup_seconds:.1f}"
    rows["queue type"] = ", ".join(queue_types) or "?"
    rows["leader stopped (stop_app) / new leader"] = f"{leader} / {new_leader}"
    rows[RSS_ROW] = fmt_rss(rss0, rss_kib())
    rows["result"] = result
    write_results("5-cluster", "5. 3-node cluster, queue leader stopped mid-stream", rows)
    assert queue_types == ["quorum"], queue_types
    assert_outcome(outcome, "cluster leader stop")
    assert complete, result
    assert new_leader, "no new leader listed"
    assert new_leader != leader, f"{leader} still leads"


KILL_EVENTS = 2000  # at 100/s: 20 s of stream, the kill at 4 s, the node back by ~15 s
DOWN_FOR = 3.0  # s the killed node stays down before it is started again


@pytest.mark.timeout(300)
async def test_leader_node_killed_and_restarted(rabbit_cluster: rmq.Cluster, unique) -> None:
    """5b. The VM (``beam.smp``) of the node leading the group's quorum queue is SIGKILLed
    mid-stream -- no shutdown, no goodbye to the peers or the clients -- with the publisher
    and both groups' consumers connected to that node (node list ``c2,c3,c1``, so they are
    on c2 and the queues, declared there, are led by it). They fail over to the next node;
    the node is started again on its data directory after DOWN_FOR s, while the stream goes
    on, and rejoins the cluster. Its pid is the one its ``rabbitmqctl eval os:getpid()``
    gives, checked against the process's environment (this run's node name and
    /tmp/rmqc data directory) before the signal: never the machine's own broker.

    Duplicates: the kill touches each group's consumer once (its connection and its queue's
    leader die together), so at most its 30 unacked deliveries (prefetch 3 x concurrency 10)
    come back, plus one copy per failed publish attempt (one that reached a queue before its
    confirm was lost). The restart touches no client: they are on other nodes by then, and
    leadership does not move back to the returning node (a follower that catches up).
    Most failed publishes are the broker's own nacks while the queue has no leader (the bus
    raises a nack as BusCapacityExceeded); publish_numbered retries them like any failure.
    """
    await asyncio.to_thread(rabbit_cluster.make_whole)
    began = time.monotonic()
    rss0 = rss_kib()
    order = ("c2", "c3", "c1")
    url = rmq.multi_url(order)
    rec = Recorder(unique("run"))
    groups = [unique("rel-kill-a"), unique("rel-kill-b")]
    stats = PublishStats()
    faults: list[float] = []
    leader = new_leader = ""
    victim = ""
    pids: tuple[int, int] = (0, 0)
    clients_before: list[str] = []
    clients_after: list[str] = []
    back_after = 0.0
    members: tuple[list[str], list[str]] = ([], [])
    async with MessageBus(unique("rel-pub"), url, grace_period=2.0) as publisher:
        buses, subs = await start_groups(rec, groups, [url, url])
        try:
            leader = await asyncio.to_thread(
                rabbit_cluster.leader_of, subs[0].queue_name, ask=order[0]
            )
            victim = leader.split("@")[0]
            clients_before = [node_of(b) for b in (publisher, *buses)]
            pub = asyncio.create_task(
                publish_numbered(publisher, rec.run, range(KILL_EVENTS), stats, rate=100)
            )
            try:
                await asyncio.wait({pub}, timeout=4.0)
                assert not pub.done(), "publisher finished before the node was killed"
                pid, killed_at = await asyncio.to_thread(rabbit_cluster.kill, victim)
                faults.append(killed_at)
                await asyncio.sleep(DOWN_FOR)
                await asyncio.to_thread(rabbit_cluster.restart, victim)
                back_after = time.time() - killed_at
                pids = (pid, await asyncio.to_thread(rabbit_cluster.pid, victim))
                await asyncio.wait_for(pub, timeout=150)
            finally:
                pub.cancel()
            complete = await wait_all_handled(stats, lambda: rec.handled, groups, timeout=90)
            clients_after = [node_of(b) for b in (publisher, *buses)]
            survivor = next(s for s in order if s != victim)
            new_leader = await asyncio.to_thread(
                rabbit_cluster.leader_of, subs[0].queue_name, ask=survivor
            )
            members = await await_members_online(rabbit_cluster, subs[0].queue_name, ask=survivor)
        finally:
            for bus in buses:
                await bus.stop(grace_period=2.0)
    bound = DupBound(in_flight=30, faults=len(faults), publish_retries=stats.retries)
    outcome = analyse(stats, rec.handled, groups=groups, faults=faults, bound=bound)
    problems = [] if complete else ["not all handled within 90 s"]
    if sorted(members[1]) != sorted(members[0]) or len(members[0]) != 3:
        problems.append(f"queue members {members[0]}, online {members[1]}")
    result = verdict(outcome, problems)
    rows = common_rows(stats, outcome, len(faults), time.monotonic() - began)
    rows["cluster start-up (s)"] = f"{rabbit_cluster.startup_seconds:.1f}"
    rows["clients' node (publisher, group a, group b) before / after"] = (
        f"{', '.join(clients_before)} / {', '.join(clients_after)}"
    )
    rows["leader killed (SIGKILL of beam.smp, pid) / new leader"] = (
        f"{leader} (pid {pids[0]}) / {new_leader}"
    )
    rows["node down for (s), then restarted"] = f"{DOWN_FOR:.0f}"
    rows["node back (rejoined, every node lists it running) after the kill (s)"] = (
        f"{back_after:.1f} (new pid {pids[1]})"
    )
    rows["queue members online after the rejoin"] = f"{len(members[1])} of {len(members[0])}"
    rows[RSS_ROW] = fmt_rss(rss0, rss_kib())
    rows["result"] = result
    write_results(
        "5b-cluster-kill", "5b. 3-node cluster, queue leader's VM SIGKILLed and restarted", rows
    )
    assert clients_before == [victim] * 3, f"clients not on the killed node: {clients_before}"
    assert victim not in clients_after, f"a client is still on {victim}: {clients_after}"
    assert_outcome(outcome, "cluster leader kill")
    assert complete, result
    assert pids[1] != pids[0], f"{victim} has the same pid after the restart: {pids}"
    assert new_leader, "no new leader listed"
    assert new_leader != leader, f"{leader} still leads"
    assert len(members[0]) == 3, f"queue members: {members[0]}"
    assert sorted(members[1]) == sorted(members[0]), f"members / online: {members}"


PARTITION_EVENTS = 2500  # at 100/s: 25 s of stream, the cut at 5 s, healed at 15 s
PARTITION_HOLD = 10.0  # s from the cut to the heal
LATE_AFTER = 1.0  # s after the cut: no confirm through the cut-off node from then on
MINORITY_LOG = "Cluster minority/secondary status detected"  # pause_minority pausing


@pytest.mark.timeout(300)
async def test_node_partitioned_from_the_majority(rabbit_cluster: rmq.Cluster, unique) -> None:
    """5c. One node (c3, the victim) is cut off from the other two for PARTITION_HOLD s and
    healed, mid-stream. The partition is made at the Erlang distribution layer, where the
    nodes see each other (there is no firewall to use here, only ``tc``): the victim uses a
    wrong cookie towards each peer and drops its connections to them, so every
    reconnection either side tries is refused at the handshake (:meth:`Cluster.partition`);
    rabbitmqctl still reaches the victim on its own connection to heal it. A refused
    partition, not a silent one: both sides see the other go down at once (no shorter
    net_ticktime needed). Checked, not assumed: neither side can ping the other, the
    majority lists only itself as running, and the victim pauses (pause_minority: its
    broker stops and closes its clients' connections) until the heal, then starts again
    and rejoins.

    The minority side is given work: the publisher and group a's consumer list the victim
    first (``c3,c1,c2``), so they are on it until it pauses, and group a's queue, declared
    through it, is led by it; group b's consumer and queue are on the majority (``c1,...``).
    Each publish notes the node its confirm came through (:class:`ConfirmedOn`): every
    event confirmed by the minority node -- in the seconds before the cut, up to the last
    one -- must be handled by both groups (a quorum queue confirms only what a majority
    holds), and none may be confirmed through it after the cut (it has no majority).

    Duplicates: the partition touches group a's consumer once (the paused victim closes its
    connection; its queue's leader changes with it), so at most its 30 unacked deliveries
    (prefetch 3 x concurrency 10) come back. Group b's consumer is not touched (its node and
    its queue's leader stay up), so its duplicates are checked against the failed publishes
    alone. Each failed publish attempt adds at most one copy per group: while group a's
    queue is without a reachable leader the broker nacks publishes through the majority,
    and a nacked message may still be in group b's queue and even in group a's (both seen:
    about one duplicate per nack in a group). The heal touches no client: they are all on
    the majority by then, and leadership does not move back to the victim.
    """
    await asyncio.to_thread(rabbit_cluster.make_whole)
    began = time.monotonic()
    rss0 = rss_kib()
    victim = "c3"
    victim_first = rmq.multi_url(("c3", "c1", "c2"))
    majority_first = rmq.multi_url(("c1", "c2", "c3"))
    rec = Recorder(unique("run"))
    groups = [unique("rel-part-a"), unique("rel-part-b")]
    stats = PublishStats()
    faults: list[float] = []
    leaders_before: list[str] = []
    leaders_after: list[str] = []
    clients_before: list[str] = []
    clients_after: list[str] = []
    evidence: dict[str, object] = {}
    paused_after = cut_at = healed_at = whole_after = 0.0
    async with MessageBus(unique("rel-pub"), victim_first, grace_period=2.0) as publisher:
        tracked = ConfirmedOn(publisher)
        buses, subs = await start_groups(rec, groups, [victim_first, majority_first])
        try:
            leaders_before = [
                await asyncio.to_thread(rabbit_cluster.leader_of, sub.queue_name, ask="c1")
                for sub in subs
            ]
            clients_before = [node_of(b) for b in (publisher, *buses)]
            pub = asyncio.create_task(
                publish_numbered(
                    cast(MessageBus, tracked), rec.run, range(PARTITION_EVENTS), stats, rate=100
                )
            )
            try:
                await asyncio.wait({pub}, timeout=5.0)
                assert not pub.done(), "publisher finished before the partition"
                cut_at = await asyncio.to_thread(rabbit_cluster.partition, victim)
                faults.append(cut_at)
                deadline = time.monotonic() + 15.0
                while await asyncio.to_thread(rabbit_cluster.running, victim):
                    assert time.monotonic() < deadline, f"{victim} did not pause within 15 s"
                    await asyncio.sleep(0.2)
                paused_at = await asyncio.to_thread(
                    rabbit_cluster.logged_at, victim, MINORITY_LOG, after=cut_at - 1.0
                )
                paused_after = (paused_at or time.time()) - cut_at
                evidence = {
                    "c1 pings c3": await asyncio.to_thread(rabbit_cluster.reaches, "c1", victim),
                    "c3 pings c1": await asyncio.to_thread(rabbit_cluster.reaches, victim, "c1"),
                    "c2 pings c3": await asyncio.to_thread(rabbit_cluster.reaches, "c2", victim),
                    "c1 running_nodes": await asyncio.to_thread(rabbit_cluster.running_nodes, "c1"),
                }
                await asyncio.sleep(max(0.0, cut_at + PARTITION_HOLD - time.time()))
                healed_at = await asyncio.to_thread(rabbit_cluster.heal, victim)
                await asyncio.to_thread(rabbit_cluster.await_whole, within=60.0)
                whole_after = time.time() - healed_at
                await asyncio.wait_for(pub, timeout=150)
            finally:
                pub.cancel()
                if victim in rabbit_cluster.partitioned:
                    await asyncio.to_thread(rabbit_cluster.heal, victim)
            complete = await wait_all_handled(stats, lambda: rec.handled, groups, timeout=90)
            clients_after = [node_of(b) for b in (publisher, *buses)]
            leaders_after = [
                await asyncio.to_thread(rabbit_cluster.leader_of, sub.queue_name, ask="c1")
                for sub in subs
            ]
        finally:
            for bus in buses:
                await bus.stop(grace_period=2.0)
    minority = {n for n, node in tracked.node.items() if node == victim}
    # A confirm already on its way when the connections dropped may land a moment later;
    # one a second after the cut would have been made without a majority.
    minority_late = sorted(n for n in minority if stats.confirmed_at[n] > cut_at + LATE_AFTER)
    unknown = sorted(n for n, node in tracked.node.items() if node == "?")
    minority_lost = {g: sorted(minority - set(rec.ids(g))) for g in groups}
    last_minority = max((stats.confirmed_at[n] for n in minority), default=0.0)
    bound = DupBound(in_flight=30, faults=len(faults), publish_retries=stats.retries)
    outcome = analyse(stats, rec.handled, groups=groups, faults=faults, bound=bound)
    problems = [] if complete else ["not all handled within 90 s"]
    if any(minority_lost.values()):
        problems.append(f"confirmed on the minority side and lost: {minority_lost}")
    if minority_late:
        problems.append(f"confirmed through the cut-off node after the cut: {minority_late[:10]}")
    partitioned = (
        evidence.get("c1 pings c3") is False
        and evidence.get("c3 pings c1") is False
        and evidence.get("c2 pings c3") is False
        and rmq.node_name(victim) not in cast(list[str], evidence.get("c1 running_nodes", []))
    )
    if not partitioned:
        problems.append(f"not a real partition: {evidence}")
    untouched_dups = outcome.duplicates[groups[1]]
    if untouched_dups > stats.retries:
        problems.append(
            f"group b (its consumer untouched) has {untouched_dups} duplicates, more than "
            f"the {stats.retries} failed publishes"
        )
    result = verdict(outcome, problems)
    rows = common_rows(stats, outcome, len(faults), time.monotonic() - began)
    rows["cluster start-up (s)"] = f"{rabbit_cluster.startup_seconds:.1f}"
    rows["partition made by"] = (
        f"{victim}: wrong Erlang cookie towards each peer + disconnect_node (both directions "
        "refused at the handshake); cluster_partition_handling = pause_minority"
    )
    rows["partition checked (ping = reachable over distribution)"] = evidence
    rows["victim paused (pause_minority, from its log) after the cut (s)"] = f"{paused_after:.2f}"
    rows["partition held (s) / cluster whole again after the heal (s)"] = (
        f"{PARTITION_HOLD:.0f} / {whole_after:.1f}"
    )
    rows["clients' node (publisher, group a, group b) before / after"] = (
        f"{', '.join(clients_before)} / {', '.join(clients_after)}"
    )
    rows["queue leaders (group a, group b) before / after"] = (
        f"{', '.join(leaders_before)} / {', '.join(leaders_after)}"
    )
    rows["confirmed on the minority side (through c3)"] = (
        f"{len(minority)} (the last {cut_at_str(last_minority, cut_at)}); more than "
        f"{LATE_AFTER:.0f} s after the cut: {len(minority_late)}; node not known "
        f"(connection changed mid-publish): {len(unknown)}"
    )
    rows["confirmed on the minority side and lost"] = sum(len(v) for v in minority_lost.values())
    rows[RSS_ROW] = fmt_rss(rss0, rss_kib())
    rows["result"] = result
    write_results(
        "5c-cluster-partition",
        "5c. 3-node cluster, one node partitioned from the majority (pause_minority), healed",
        rows,
    )
    assert partitioned, f"the partition was not real: {evidence}"
    assert clients_before == [victim, victim, "c1"], f"clients before the cut: {clients_before}"
    assert leaders_before[0] == rmq.node_name(victim), f"leaders before: {leaders_before}"
    assert victim not in clients_after, f"a client is still on {victim}: {clients_after}"
    assert minority, "nothing was confirmed through the minority node before the cut"
    assert not any(minority_lost.values()), f"minority-confirmed events lost: {minority_lost}"
    assert not minority_late, f"confirmed through {victim} after the cut: {minority_late[:10]}"
    assert_outcome(outcome, "cluster partition")
    assert untouched_dups <= stats.retries, result
    assert complete, result


def cut_at_str(last: float, cut_at: float) -> str:
    """When the last minority confirm came, relative to the cut."""
    if not last or not cut_at:
        return "-"
    return f"{last - cut_at:+.2f} s from the cut"
