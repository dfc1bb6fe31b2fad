"""Scenario 5: a 3-node RabbitMQ cluster on this machine, two faults of a node mid-stream
while publishing and consuming go on through the other nodes: the node leading the group's
quorum queue stopped (5), its VM SIGKILLed and restarted (5b).

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

import pytest

from banyan_bus import MessageBus
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
