"""Scenario 11: the transactional outbox under faults: a relay SIGKILLed between publish and
mark-sent, and the broker restarted mid-relay.

A writer appends events (``ReliabilityTicked``, number ``n``) to 8 streams in PostgreSQL
(``PostgresEventStore``, a schema of its own, dropped afterwards), one event per stream per
transaction round, while relay processes (``tests/reliability/outbox_relay_proc.py``)
publish the outbox and a group records every handling through an ordered subscription
(partition key = stream, which the relay sets). Stream ``s<n % 8>``; ``n``'s place in its
stream is ``n // 8``.

Faults:

1. The first relay SIGKILLs itself inside its 3rd ``_mark_sent``: the batch's publishes were
   confirmed, ``sent_at`` was not written (the at-least-once seam of ``banyan_bus.outbox``).
   PostgreSQL rolls the claim back; a new relay starts and publishes those rows again.
2. The shared broker is restarted (``rabbitmqctl stop_app``, 3 s, ``start_app``,
   ``await_startup``) while that relay publishes; its failed publishes leave their rows
   unsent, and it retries with a backoff.

What the outbox promises (its module doc) and what is asserted:

* nothing lost: every stored event is published and handled at least once;
* at least once, re-sent only at the seam: in the relays' confirmed publishes, the
  numbers published twice are exactly the killed batch's unmarked rows (and those
  exactly twice); a failed publish is retried, never skipped;
* per-stream order: across both relays, each stream's confirmed publishes go forward one
  position at a time, except the one rewind to the unmarked rows (``harness.check_order``);
  the group's handlings too (every one the stream's next, or a replay from an already
  handled one), so each stream's first handlings are in stream order;
* duplicates at the group <= the re-sent rows + failed publish attempts (a publish that
  raised may still have been queued) + the ordered stream's unacked deliveries
  (prefetch x partitions) for the one fault that touches the consumer, the restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from banyan_bus import MessageBus
from banyan_bus.eventstore import PostgresEventStore
from tests.reliability.harness import (
    REPO,
    RSS_ROW,
    DupBound,
    PublishStats,
    Recorder,
    ReliabilityTicked,
    analyse,
    assert_outcome,
    check_order,
    common_rows,
    fmt_rss,
    rss_kib,
    verdict,
    wait_all_handled,
    write_results,
)
from tests.reliability.rabbitmq_admin import rabbitmqctl

pytestmark = [pytest.mark.reliability, pytest.mark.amqp]

POSTGRES_URL = os.environ.get(
    "BANYAN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
STREAMS = 8
ROUNDS = 250  # events = STREAMS x ROUNDS
RATE = 120.0  # events appended per second
BATCH = 50  # the relays' batch_size
KILL_AT = 3  # the first relay dies in its 3rd _mark_sent
PARTITIONS = 4
CONCURRENCY = 10
PREFETCH = 3 * CONCURRENCY  # per partition queue


def stream_of(n: int) -> str:
    return f"s{n % STREAMS}"


class RelayProc:
    """``tests/reliability/outbox_relay_proc.py`` as a subprocess; its files under ``tmp``."""

    def __init__(self, tmp: Path, tag: str, url: str, schema: str, **opts: object) -> None:
        self.tag = tag
        self.events = tmp / f"relay-{tag}.txt"
        self.ready = tmp / f"relay-ready-{tag}"
        self.log = tmp / f"relay-{tag}.log"
        cmd = [
            sys.executable,
            "-u",
            "-m",
            "tests.reliability.outbox_relay_proc",
            "--url",
            url,
            "--postgres",
            POSTGRES_URL,
            "--schema",
            schema,
            "--log",
            str(self.events),
            "--ready",
            str(self.ready),
            "--batch-size",
            str(BATCH),
            "--service",
            f"rel-outbox-relay-{tag}",
        ]
        for name, value in opts.items():
            cmd += ["--" + name.replace("_", "-"), str(value)]
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def lines(self, kind: str) -> list[list[str]]:
        if not self.events.exists():
            return []
        out = []
        for line in self.events.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == kind and len(parts) >= 4:
                out.append(parts[1:])
        return out

    def published(self) -> list[tuple[int, float]]:
        """``(n, time)`` of each confirmed publish."""
        return [(int(p[0]), float(p[2])) for p in self.lines("P")]

    def failed(self) -> list[tuple[int, float, str]]:
        return [(int(p[0]), float(p[2]), p[3] if len(p) > 3 else "?") for p in self.lines("F")]

    def batches(self) -> int:
        return len(self.lines("B"))

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"relay {self.tag} exited {code}: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"relay {self.tag} not ready in {timeout} s: {self.tail()}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"relay {self.tag} still running after {timeout} s")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            code = None  # did not stop on SIGTERM
        else:
            code = self.proc.returncode
        self._log_file.close()
        return code


@pytest.fixture
def broker_restarted_afterwards() -> Iterator[None]:
    """Whatever happens in the test, start the shared broker's app again at teardown
    (``start_app`` on a running app is a no-op)."""
    yield
    subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=120, check=False)
    subprocess.run(["rabbitmqctl", "await_startup"], capture_output=True, timeout=180, check=False)


@pytest.fixture
async def pg_schema() -> Any:
    """A schema only this test uses, in the real PostgreSQL (fails loudly if it does not
    answer); dropped afterwards."""
    schema = f"banyan_rel_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc}. Start it with "
            "`bash scripts/services.sh postgres` or set BANYAN_TEST_POSTGRES_URL",
            pytrace=False,
        )
    await conn.close()
    yield schema
    conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _write(store: PostgresEventStore, run: str, stored: set[int]) -> None:
    """ROUNDS transactions, each appending one event to every stream, at RATE events/s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for r in range(ROUNDS):
        delay = start + r * STREAMS / RATE - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        numbers = range(r * STREAMS, (r + 1) * STREAMS)
        async with store.unit_of_work() as uow:
            for n in numbers:
                event = ReliabilityTicked(run=run, n=n)
                await uow.append(stream_of(n), [event], expected_version=r)
        stored.update(numbers)


def _first_handlings_in_order(records: list[tuple[int, float]]) -> list[str]:
    """Streams whose first handlings (each number's earliest) are not in stream order."""
    first: dict[int, float] = {}
    for n, t in records:
        first[n] = min(t, first.get(n, t))
    per_stream: dict[str, list[int]] = {}
    for n in sorted(first, key=first.__getitem__):
        per_stream.setdefault(stream_of(n), []).append(n)
    return [s for s, ns in per_stream.items() if ns != sorted(ns)]


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("broker_restarted_afterwards")
async def test_outbox_relay_killed_and_broker_restarted(
    amqp_url: str, unique, tmp_path: Path, pg_schema: str
) -> None:
    """2000 events over 8 streams appended at 120/s; relay 1 SIGKILLed in its 3rd
    mark-sent (batches of 50), relay 2 started at once; the broker restarted while relay 2
    publishes. Nothing lost, re-sends only at the seam, per-stream order kept, duplicates
    within the bound (see the module doc)."""
    began = time.monotonic()
    rss0 = rss_kib()
    rec = Recorder(unique("run"))
    group = unique("rel-outbox")
    stored: set[int] = set()
    relays: list[RelayProc] = []
    marker = tmp_path / "killed-batch.json"
    faults: list[float] = []
    downtime = 0.0
    unsent_at_restart = 0
    restarted = 0.0
    second_stop: int | None = None
    store = PostgresEventStore(POSTGRES_URL, schema=pg_schema, max_size=2)
    await store.open()
    try:
        async with AsyncExitStack() as stack:
            consumer = MessageBus(group, amqp_url, grace_period=2.0)
            await consumer.subscribe(
                ReliabilityTicked,
                rec.handler(group),
                ordered=True,
                partitions=PARTITIONS,
                concurrency=CONCURRENCY,
                prefetch=PREFETCH,
            )
            await stack.enter_async_context(consumer)
            writer = asyncio.create_task(_write(store, rec.run, stored))
            try:
                # A backlog first, so the killed relay's batches are full ones.
                await asyncio.wait({writer}, timeout=2.0)
                first = RelayProc(
                    tmp_path, "1", amqp_url, pg_schema, kill_at_mark=KILL_AT, marker=marker
                )
                relays.append(first)
                code = await first.wait_exit(timeout=60)
                assert code == -signal.SIGKILL, f"relay 1 exited {code}: {first.tail()}"
                killed = json.loads(marker.read_text())
                faults.append(killed["time"])
                second = RelayProc(tmp_path, "2", amqp_url, pg_schema)
                relays.append(second)
                await second.wait_ready()
                # Restart the broker once relay 2 is past the re-sends and relaying.
                deadline = time.monotonic() + 30
                while len(second.published()) < len(killed["unmarked"]) + 100:
                    assert time.monotonic() < deadline, f"relay 2 is stuck: {second.tail()}"
                    assert not writer.done(), "the writer finished before the restart"
                    await asyncio.sleep(0.05)
                unsent_at_restart = await store.count_unsent()
                faults.append(time.time())
                stopped = time.monotonic()
                try:
                    await asyncio.to_thread(rabbitmqctl, "stop_app")
                    await asyncio.sleep(3.0)  # appends go on; the relay's publishes fail
                finally:
                    await asyncio.to_thread(rabbitmqctl, "start_app")
                    restarted = time.time()
                    await asyncio.to_thread(rabbitmqctl, "await_startup", timeout=180)
                    downtime = time.monotonic() - stopped
                await asyncio.wait_for(writer, timeout=60)
            finally:
                writer.cancel()
            deadline = time.monotonic() + 60
            while await store.count_unsent():
                assert time.monotonic() < deadline, f"outbox not drained: {second.tail()}"
                await asyncio.sleep(0.1)
            stats = PublishStats(attempted=set(stored), confirmed=set(stored))
            complete = await wait_all_handled(stats, lambda: rec.handled, [group], timeout=60)
            await asyncio.sleep(1.0)  # late duplicates show now
            second_stop = await second.stop()
    finally:
        for relay in relays:
            await relay.stop()
        await store.close()

    records = rec.handled.get(group, [])
    published = sorted(
        (p for relay in relays for p in relay.published()), key=lambda p: p[1]
    )  # both relays' confirmed publishes, in time order (relay 1 was dead before relay 2)
    failed = [f for relay in relays for f in relay.failed()]
    stats.failures = Counter(error for _, _, error in failed)
    counts = Counter(n for n, _ in published)
    twice = {n: c for n, c in counts.items() if c > 1}
    unmarked = set(killed["unmarked"])
    never_published = sorted(stored - set(counts))
    publish_order = check_order(published, stream_of, stored)
    handling_order = check_order(records, stream_of, stored)
    firsts_out_of_order = _first_handlings_in_order(records)
    after_restart = [t for _, t in second.published() if t > restarted]
    second_first = min((t for _, t in second.published()), default=None)

    bound = DupBound(
        in_flight=PREFETCH * PARTITIONS,
        faults=1,
        publish_retries=len(failed),
        extra=len(unmarked),
        note="rows re-sent by the new relay (confirmed, not marked sent at the kill)",
    )
    outcome = analyse(stats, rec.handled, groups=[group], faults=faults, bound=bound)
    problems = [] if complete else ["not all handled within 60 s"]
    if never_published:
        problems.append(f"stored, never published: {never_published[:10]}")
    if set(twice) != unmarked or any(c != 2 for c in twice.values()):
        problems.append(
            f"published twice {sorted(twice)[:10]} (x{sorted(set(twice.values()))}) is not "
            f"exactly the unmarked batch {sorted(unmarked)[:10]}"
        )
    if publish_order.violations:
        problems.append(f"publish order: {publish_order.violations[:3]}")
    if handling_order.violations:
        problems.append(f"handling order: {handling_order.violations[:3]}")
    if firsts_out_of_order:
        problems.append(f"first handlings out of stream order: {firsts_out_of_order}")
    if not failed:
        problems.append("the broker restart failed no publish of the relay (not mid-relay?)")
    if second_stop != 0:
        problems.append(f"relay 2 did not stop cleanly on SIGTERM: {second_stop}")
    result = verdict(outcome, problems)

    rows = common_rows(stats, outcome, len(faults), time.monotonic() - began)
    rows["events published (confirmed)"] = f"{len(stored)} stored (appended and committed)"
    rows["publish attempts that failed (retried)"] = (
        f"{len(failed)} {dict(stats.failures)} (relay publishes)" if failed else "0"
    )
    rows["faults (in order)"] = "relay SIGKILLed between publish and mark-sent, broker restart"
    rows["streams / events per stream / batch size"] = f"{STREAMS} / {ROUNDS} / {BATCH}"
    rows["killed relay: batches marked before the kill"] = KILL_AT - 1
    rows["killed batch: rows / confirmed and left unmarked / streams"] = (
        f"{len(killed['batch'])} / {len(unmarked)} / {len(killed['streams'])}"
    )
    rows["re-sent by the new relay (published twice)"] = (
        f"{len(twice)} (exactly the unmarked rows: {set(twice) == unmarked})"
    )
    rows["new relay's first publish after the kill (s)"] = (
        "-" if second_first is None else f"{second_first - killed['time']:.2f}"
    )
    rows["broker down (stop_app .. await_startup done, s)"] = f"{downtime:.1f}"
    rows["unsent rows when the broker stopped"] = unsent_at_restart
    rows["relay's first confirm after start_app returned (s)"] = (
        f"{min(after_restart) - restarted:.2f}" if after_restart else "none"
    )
    rows["confirmed publishes (both relays) / rewinds"] = (
        f"{len(published)} / {publish_order.rewinds} (order violations "
        f"{len(publish_order.violations)})"
    )
    rows["handlings checked for order / replays / violations"] = (
        f"{handling_order.events} / {handling_order.rewinds} / {len(handling_order.violations)}"
    )
    rows["streams whose first handlings are out of order"] = len(firsts_out_of_order)
    extra = Counter(n for n, _ in records)
    for n in unmarked:
        extra[n] -= 1  # the re-send's copy
    doubled = [n for n, c in extra.items() for _ in range(c - 1)]
    retried = {n for n, _, _ in failed}
    rows["duplicates beyond the re-sends: of a failed publish / redelivered"] = (
        f"{sum(n in retried for n in doubled)} / {sum(n not in retried for n in doubled)}"
    )
    rows["published per relay"] = {r.tag: len(r.published()) for r in relays}
    rows[RSS_ROW] = fmt_rss(rss0, rss_kib())
    rows["result"] = result
    write_results("11-outbox-faults", "11. Outbox relay killed mid-batch, broker restarted", rows)
    assert not problems, result
    assert_outcome(outcome, "outbox faults")
