"""Scenario 5: a 3-node RabbitMQ cluster on this machine; the node leading the group's quorum
queue is stopped mid-stream, and publishing and consuming go on through the other nodes.

The clients are given every node, comma-separated (how a user runs banyan_bus against a
cluster)::

    MessageBus("svc", "amqp://u:p@node1:5672/,amqp://u:p@node2:5672/,amqp://u:p@node3:5672/")

They connect to the first node that answers and, after losing it, reconnect to the next
ones in turn. The cluster (nodes c1/c2/c3@localhost, ports 5701-5703) is started once per
run by a module fixture and stopped (only those nodes) at the end; if it cannot start, the
test fails -- it is never skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from banyan_bus import MessageBus
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

pytestmark = [pytest.mark.reliability]


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[rmq.Cluster]:
    started = rmq.start_cluster()  # raises ClusterError (test error, not a skip)
    try:
        yield started
    finally:
        problems = rmq.stop_cluster(started)
        assert not problems, f"stopping the cluster: {problems}"


@pytest.mark.timeout(360)
async def test_leader_node_stopped_mid_stream(rabbit_cluster: rmq.Cluster, unique) -> None:
    """Duplicates: stopping the leader touches each group's consumer once (its connection,
    or its queue's leader), so at most its 30 unacked deliveries (default prefetch 3 x
    concurrency 10) come back, plus one copy per failed publish attempt."""
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
