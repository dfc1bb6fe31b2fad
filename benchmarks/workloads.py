"""One benchmark run in a fresh process; prints one ``BENCH_RESULT {json}`` line.

::

    python benchmarks/workloads.py IMPL WORKLOAD --n N [options]

IMPL is ``aiormq`` (hand-written raw aiormq: the floor), ``raw`` (hand-written aio-pika
best practice), ``faststream`` (RabbitBroker, pydantic-typed subscriber) or ``banyan``
(banyan_bus). WORKLOAD is one of:

* ``publish-seq``   publish N with confirms, awaiting each;
* ``publish-pipe``  publish N with confirms, ``--window`` (500) in flight (gather per window);
* ``consume``       consume N from a pre-filled queue into a typed handler (``--prefetch``);
* ``latency``       publish at ``--rate`` msg/s while consuming; end-to-end latency;
* ``io``            consume N with handlers that ``await asyncio.sleep(--sleep)``,
                    ``--prefetch`` 100 and ``--concurrency`` 50;
* ``workers``       banyan only: ``--workers`` K processes consume one group's pre-filled queue.

Every run uses a vhost of its own (created and deleted here), checks its own
correctness (every message published or handled exactly once, nothing left
behind in the queue, nothing dead-lettered) and exits 1 with ``"ok": false``
when it is not — a fast wrong run never counts.

Throughput of the consume workloads is measured from the first to the last
handled message (``(N-1) / span``), so connection setup and declarations are
outside the window for every implementation alike; client CPU is
``time.process_time()`` over the same window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# banyan_bus from this checkout, or from the snapshot run.py --banyan-ref extracted
sys.path.insert(1, os.environ.get("BENCH_BANYAN_SRC") or str(HERE.parent))

import vhosts  # noqa: E402
from bench_env import broker_trouble  # noqa: E402  (memory.py: wl.broker_trouble)

RESULT_MARK = "BENCH_RESULT "
EXCHANGE = "bench.events"  # raw and FastStream: a durable topic exchange ...
QUEUE = "bench.queue"  # ... bound to one durable queue with ROUTING_KEY
ROUTING_KEY = "benchitemcreated"
GROUP = "bench"  # banyan: the subscription group; its queue is named below
BANYAN_QUEUE = f"exchange.platform.events.{GROUP}.{ROUTING_KEY}"
BANYAN_DLQ = f"dlq.{BANYAN_QUEUE}"
PAYLOAD_BYTES = 1024
IMPLS = ("aiormq", "raw", "faststream", "banyan")
WORKLOADS = ("publish-seq", "publish-pipe", "consume", "latency", "io", "workers")
HELPERS = ("_prepare", "_verify", "_worker")  # run in their own processes (see below)
EXIT_FAILED, EXIT_INFRA = 1, 2  # a wrong or broken run / the broker's admin API failed


_T0 = time.monotonic()


def phase(text: str) -> None:
    """Progress on stderr, so a run that hangs shows where (run.py prints the tail)."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


def _find_broker_pid() -> int | None:
    """The local RabbitMQ (``beam.smp``) process, to read its CPU time; None if not local."""
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "beam.smp":
                        return int(entry)
            except OSError:
                continue
    return None


_BROKER_PID = _find_broker_pid()
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def broker_cpu() -> float:
    """CPU seconds the broker has used so far (NaN if it is not a local process).

    The broker is shared with whatever else runs here, so per-message figures from it
    are indicative: they show what the broker costs next to the client."""
    if _BROKER_PID is None:
        return float("nan")
    try:
        with open(f"/proc/{_BROKER_PID}/stat") as f:
            fields_ = f.read().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / _TICK  # utime + stime
    except (OSError, IndexError, ValueError):
        return float("nan")


class BenchFailure(Exception):
    """The run was wrong (lost, duplicated or left-over messages): it must not count."""


# -- the payload: ~1 KiB of JSON, the same fields for every implementation ------------------


class Payload(BaseModel):
    seq: int
    uid: str
    sent_at: float
    source: str
    tags: list[str]
    data: str


_RUN_ID = uuid.uuid4().hex[:12]
_BASE = {"source": "benchmarks", "tags": ["bench", "load", "json"]}


def _pad(size: int) -> str:
    """The padding that makes a payload ``size`` bytes of JSON."""
    head = Payload(seq=0, uid=f"{_RUN_ID}-{0:08d}", sent_at=time.time(), data="", **_BASE)
    return "x" * max(0, size - len(head.model_dump_json().encode()))


_PAD = _pad(PAYLOAD_BYTES)


def set_payload_bytes(size: int) -> None:
    """Make every payload this process sends ``size`` bytes of JSON (memory.py's 256 KiB)."""
    global _PAD
    _PAD = _pad(size)


def fields(seq: int, sent_at: float = 0.0) -> dict[str, Any]:
    """The payload fields of message ``seq`` (1 KiB once serialized)."""
    return {"seq": seq, "uid": f"{_RUN_ID}-{seq:08d}", "sent_at": sent_at, "data": _PAD, **_BASE}


# -- what a run records --------------------------------------------------------------------


class Recorder:
    """Counts handled messages by ``seq``; duplicates and strangers are errors."""

    def __init__(self, n: int, *, latencies: bool = False) -> None:
        self.n = n
        self.seen = bytearray(n)
        self.count = 0
        self.errors: list[str] = []
        self.done = asyncio.Event()
        self.t_first = self.t_last = self.cpu_first = self.cpu_last = 0.0
        self.broker_first = self.broker_last = 0.0
        self.latency = array("d", bytes(8 * n)) if latencies else None

    def hit(self, seq: int, sent_at: float = 0.0) -> None:
        now = time.monotonic()
        if self.latency is not None and 0 <= seq < self.n:
            self.latency[seq] = time.time() - sent_at
        if self.count == 0:
            self.t_first, self.cpu_first = now, time.process_time()
            self.broker_first = broker_cpu()
        if not 0 <= seq < self.n:
            self.errors.append(f"unexpected seq {seq}")
            return
        if self.seen[seq]:
            self.errors.append(f"seq {seq} handled twice")
            return
        self.seen[seq] = 1
        self.count += 1
        if self.count == self.n:
            self.t_last, self.cpu_last = now, time.process_time()
            self.broker_last = broker_cpu()
            self.done.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            raise BenchFailure(
                f"only {self.count}/{self.n} messages handled within {timeout:.0f}s "
                f"(errors: {self.errors[:5]})"
            ) from None
        if self.errors:
            raise BenchFailure(f"{len(self.errors)} handling errors: {self.errors[:5]}")

    def window(self) -> dict[str, float]:
        span = self.t_last - self.t_first
        msgs = max(1, self.count - 1)
        return {
            "elapsed_s": span,
            "rate": msgs / span if span > 0 else 0.0,
            "cpu_us_per_msg": (self.cpu_last - self.cpu_first) / msgs * 1e6,
            "broker_cpu_us_per_msg": (self.broker_last - self.broker_first) / msgs * 1e6,
        }


@dataclass
class ConsumeSpec:
    handler: Callable[[Any], Awaitable[None]]  # receives the typed payload
    prefetch: int
    concurrency: int | None  # None: bounded by prefetch only (one task per delivery)


Publish = Callable[[int], Awaitable[Any]]


def make_handler(rec: Recorder, sleep: float) -> Callable[[Any], Awaitable[None]]:
    if sleep > 0:

        async def handle_io(event: Any) -> None:
            await asyncio.sleep(sleep)
            rec.hit(event.seq, event.sent_at)

        return handle_io

    async def handle(event: Any) -> None:
        rec.hit(event.seq, event.sent_at)

    return handle


# -- raw aio-pika helpers (also used to set up and verify every implementation) ------------


async def raw_declare(url: str, queue_type: str) -> None:
    """Topology of the raw and FastStream runs: topic exchange -> durable queue."""
    import aio_pika

    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        ex = await ch.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        args = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
        q = await ch.declare_queue(QUEUE, durable=True, arguments=args)
        await q.bind(ex, ROUTING_KEY)


async def queue_depth(url: str, queue: str) -> int:
    import aio_pika

    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)


async def expect_empty(url: str, queues: list[str], *, wait: float = 5.0) -> None:
    """Every queue in ``queues`` holds no message (acks may take a moment to land)."""
    deadline = time.monotonic() + wait
    while True:
        depths = {q: await queue_depth(url, q) for q in queues}
        if not any(depths.values()):
            return
        if time.monotonic() > deadline:
            raise BenchFailure(f"messages left behind after the run: {depths}")
        await asyncio.sleep(0.2)


async def drain_and_verify(url: str, queue: str, n: int, seq_of: Callable[[Any], int]) -> None:
    """Take every message off ``queue``; it must hold exactly seqs 0..n-1, once each."""
    import aio_pika

    seen = bytearray(n)
    got = 0
    bad: list[str] = []
    done = asyncio.Event()

    def on_message(message: Any) -> None:
        nonlocal got
        try:
            seq = seq_of(json.loads(message.body))
        except (ValueError, KeyError, TypeError) as exc:
            bad.append(f"undecodable body: {exc}")
            return
        if not 0 <= seq < n or seen[seq]:
            bad.append(f"unexpected or duplicate seq {seq}")
            return
        seen[seq] = 1
        got += 1
        if got == n:
            done.set()

    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        count = q.declaration_result.message_count or 0
        if count != n:
            raise BenchFailure(f"queue {queue} holds {count} messages after publishing {n}")

        async def consume_cb(message: Any) -> None:
            on_message(message)

        tag = await q.consume(consume_cb, no_ack=True)
        try:
            await asyncio.wait_for(done.wait(), 30 + n / 2000)
        except TimeoutError:
            raise BenchFailure(f"drained only {got}/{n} from {queue}: {bad[:5]}") from None
        await q.cancel(tag)
    if bad:
        raise BenchFailure(f"{len(bad)} bad messages in {queue}: {bad[:5]}")
    await expect_empty(url, [queue])


# -- the four implementations ---------------------------------------------------------------


class Impl:
    name = ""
    queue = QUEUE
    extra_queues: tuple[str, ...] = ()

    def __init__(self, url: str, queue_type: str) -> None:
        self.url = url
        self.queue_type = queue_type

    async def setup(self) -> None:
        await raw_declare(self.url, self.queue_type)

    def seq_of(self, body: Any) -> int:
        return int(body["seq"])

    def session(
        self, consume: ConsumeSpec | None, publish: bool
    ) -> contextlib.AbstractAsyncContextManager[Publish | None]:
        raise NotImplementedError


class Raw(Impl):
    """aio-pika as a careful user writes it: one robust connection, a confirm channel,
    prefetch set, persistent messages, ``Model.model_validate_json`` by hand."""

    name = "raw"

    @contextlib.asynccontextmanager
    async def session(self, consume: ConsumeSpec | None, publish: bool) -> AsyncIterator[Any]:
        import aio_pika

        conn = await aio_pika.connect_robust(self.url)
        try:
            pub = None
            if publish:
                ch = await conn.channel(publisher_confirms=True)
                ex = await ch.get_exchange(EXCHANGE, ensure=False)
                persistent = aio_pika.DeliveryMode.PERSISTENT

                async def pub(seq: int) -> Any:
                    payload = Payload(**fields(seq, time.time()))
                    message = aio_pika.Message(
                        payload.model_dump_json().encode(),
                        content_type="application/json",
                        delivery_mode=persistent,
                        message_id=payload.uid,
                    )
                    return await ex.publish(message, routing_key=ROUTING_KEY)

            q = tag = None
            if consume is not None:
                cch = await conn.channel()
                await cch.set_qos(prefetch_count=consume.prefetch)
                q = await cch.get_queue(QUEUE, ensure=False)
                handler = consume.handler
                validate = Payload.model_validate_json
                if consume.concurrency is None:

                    async def on_message(message: Any) -> None:
                        await handler(validate(message.body))
                        await message.ack()

                else:
                    sem = asyncio.Semaphore(consume.concurrency)

                    async def on_message(message: Any) -> None:
                        async with sem:
                            await handler(validate(message.body))
                            await message.ack()

                tag = await q.consume(on_message)
            yield pub
            if q is not None and tag is not None:
                await q.cancel(tag)
        finally:
            await conn.close()


class Aiormq(Impl):
    """The floor: raw aiormq (the AMQP client under aio-pika and banyan_bus) as a careful
    user writes it. One connection; a channel with publisher confirms, ``basic_publish``
    of persistent messages awaiting each confirm (aiormq's defaults otherwise: it also
    waits for the socket to drain); a consumer channel with the prefetch set,
    ``basic_consume`` with manual acks, ``Model.model_validate_json(message.body)`` and
    one ``basic_ack`` per delivery. aiormq runs each delivery's callback in a task of its
    own, so the prefetch bounds the handlers, as for raw aio-pika.

    One ack per delivery, not ``multiple=True``: a multiple ack is only right once every
    lower tag is handled, which takes the bookkeeping banyan_bus's ``ChannelSettler``
    does; by hand a user acks each delivery (aiormq has no batching of its own).
    """

    name = "aiormq"

    @contextlib.asynccontextmanager
    async def session(self, consume: ConsumeSpec | None, publish: bool) -> AsyncIterator[Any]:
        import aiormq
        from pamqp.commands import Basic

        conn = await aiormq.connect(self.url)
        try:
            pub = None
            if publish:
                ch = await conn.channel(publisher_confirms=True)

                async def pub(seq: int) -> Any:
                    payload = Payload(**fields(seq, time.time()))
                    properties = Basic.Properties(
                        content_type="application/json",
                        delivery_mode=2,  # persistent
                        message_id=payload.uid,
                    )
                    return await ch.basic_publish(
                        payload.model_dump_json().encode(),
                        exchange=EXCHANGE,
                        routing_key=ROUTING_KEY,
                        properties=properties,
                    )

            cch = tag = None
            running = 0  # callbacks that have not returned (a clean stop waits for them)
            idle = asyncio.Event()
            if consume is not None:
                cch = await conn.channel()
                await cch.basic_qos(prefetch_count=consume.prefetch)
                handler = consume.handler
                validate = Payload.model_validate_json
                if consume.concurrency is None:

                    async def on_message(message: Any) -> None:
                        nonlocal running
                        running += 1
                        try:
                            await handler(validate(message.body))
                            await message.channel.basic_ack(message.delivery.delivery_tag)
                        finally:
                            running -= 1
                            if not running:
                                idle.set()

                else:
                    sem = asyncio.Semaphore(consume.concurrency)

                    async def on_message(message: Any) -> None:
                        nonlocal running
                        running += 1
                        try:
                            async with sem:
                                await handler(validate(message.body))
                                await message.channel.basic_ack(message.delivery.delivery_tag)
                        finally:
                            running -= 1
                            if not running:
                                idle.set()

                ok = await cch.basic_consume(QUEUE, on_message, no_ack=False)
                tag = ok.consumer_tag
            yield pub
            if cch is not None and tag is not None:
                if running:  # a clean stop: callbacks still running ack before the cancel
                    idle.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(idle.wait(), 10)
                await cch.basic_cancel(tag)
        finally:
            await conn.close()


class FastStream(Impl):
    """FastStream's RabbitBroker: pydantic-typed subscriber, ``persist=True``, explicit
    prefetch (``Channel(prefetch_count=...)``), logging off (``logger=None``).

    FastStream's Rabbit subscriber has no concurrency option (each delivery runs in its
    own task, bounded by prefetch), so workload ``io`` bounds it with a semaphore in
    the handler, as a FastStream user would."""

    name = "faststream"

    @contextlib.asynccontextmanager
    async def session(self, consume: ConsumeSpec | None, publish: bool) -> AsyncIterator[Any]:
        from faststream.rabbit import (
            Channel,
            ExchangeType,
            QueueType,
            RabbitBroker,
            RabbitExchange,
            RabbitQueue,
        )

        broker = RabbitBroker(self.url, logger=None)
        exchange = RabbitExchange(EXCHANGE, type=ExchangeType.TOPIC, durable=True)
        if consume is not None:
            if self.queue_type == "quorum":
                queue = RabbitQueue(QUEUE, queue_type=QueueType.QUORUM, routing_key=ROUTING_KEY)
            else:
                queue = RabbitQueue(QUEUE, durable=True, routing_key=ROUTING_KEY)
            handler = consume.handler
            subscriber = broker.subscriber(
                queue, exchange, channel=Channel(prefetch_count=consume.prefetch)
            )
            if consume.concurrency is None:

                async def handle(body: Payload) -> None:
                    await handler(body)

            else:
                sem = asyncio.Semaphore(consume.concurrency)

                async def handle(body: Payload) -> None:
                    async with sem:
                        await handler(body)

            subscriber(handle)
        await broker.start()
        try:
            # Declare (cache) the exchange once at startup, as an application would; else
            # the first window of concurrent publishes each declares it.
            await broker.declare_exchange(exchange)

            async def pub(seq: int) -> Any:
                return await broker.publish(
                    Payload(**fields(seq, time.time())),
                    exchange=exchange,
                    routing_key=ROUTING_KEY,
                    persist=True,
                )

            yield pub if publish else None
        finally:
            await broker.stop()


class Banyan(Impl):
    """banyan_bus through its public API only."""

    name = "banyan"
    queue = BANYAN_QUEUE
    extra_queues = (BANYAN_DLQ,)

    def __init__(self, url: str, queue_type: str) -> None:
        super().__init__(url, queue_type)
        from banyan_bus import Event, MessageBus

        class BenchItemCreated(Event):
            seq: int
            uid: str
            sent_at: float
            source: str
            tags: list[str]
            data: str

        self.contract = BenchItemCreated
        self.MessageBus = MessageBus

    def bus(self) -> Any:
        options: dict[str, Any] = {}
        if len(_PAD) > 128 * 1024:  # memory.py's large payloads: over the 256 KiB default
            options["max_message_size"] = 4 * len(_PAD)
        return self.MessageBus(GROUP, self.url, queue_type=self.queue_type, **options)

    async def setup(self) -> None:
        """Declare the group's queue (and DLQ, delay levels) by starting a subscribed bus."""
        bus = self.bus()

        async def unused(event: Any) -> None:  # pragma: no cover - the queue is empty
            raise BenchFailure("setup consumer received a message")

        await bus.subscribe(self.contract, unused, subscription_group=GROUP)
        async with bus:
            pass

    def seq_of(self, body: Any) -> int:
        return int(body["payload"]["seq"])

    @contextlib.asynccontextmanager
    async def session(self, consume: ConsumeSpec | None, publish: bool) -> AsyncIterator[Any]:
        bus = self.bus()
        if consume is not None:
            await bus.subscribe(
                self.contract,
                consume.handler,
                subscription_group=GROUP,
                concurrency=consume.concurrency or consume.prefetch,
                prefetch=consume.prefetch,
            )
        contract = self.contract
        async with bus:

            async def pub(seq: int) -> Any:
                return await bus.publish(contract(**fields(seq, time.time())))

            yield pub if publish else None


def make_impl(name: str, url: str, queue_type: str) -> Impl:
    impls = {"aiormq": Aiormq, "raw": Raw, "faststream": FastStream, "banyan": Banyan}
    return impls[name](url, queue_type)


# -- workloads -----------------------------------------------------------------------------


async def publish_window(pub: Publish, start: int, stop: int) -> None:
    results = await asyncio.gather(*(pub(i) for i in range(start, stop)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise BenchFailure(f"{len(errors)} publishes failed, first: {errors[0]!r}")


async def fill(impl: Impl, n: int, window: int = 500) -> None:
    """Put messages 0..n-1 on the implementation's queue with its own publisher."""
    async with impl.session(None, publish=True) as pub:
        assert pub is not None
        for start in range(0, n, window):
            await publish_window(pub, start, min(n, start + window))
    await asyncio.sleep(0)
    depth = await queue_depth(impl.url, impl.queue)
    if depth != n:
        raise BenchFailure(f"fill: queue {impl.queue} holds {depth} messages, expected {n}")


async def helper(impl: Impl, args: argparse.Namespace, name: str, n: int) -> None:
    """Run ``_prepare`` or ``_verify`` in a process of its own.

    Declaring, filling and verifying are not measured; in another process they leave
    no trace in this one — not in its CPU time, its heap, or a py-spy profile of it.
    """
    cmd = [sys.executable, str(HERE / "workloads.py"), impl.name, name, "--n", str(n)]
    cmd += ["--url", impl.url, "--queue-type", impl.queue_type]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        lines = [ln for ln in out.decode().splitlines() if ln.startswith(RESULT_MARK)]
        detail = json.loads(lines[-1][len(RESULT_MARK) :]).get("error") if lines else None
        text = f"{name} ({n} messages) failed: {detail or ''}\n{err.decode()[-1500:]}"
        if proc.returncode == EXIT_INFRA:  # the helper could not reach the broker: retried
            raise ConnectionError(text)
        raise BenchFailure(text)


async def prepare(impl: Impl, args: argparse.Namespace, n: int) -> None:
    """Declare the topology and fill the queue with n messages (in another process)."""
    phase(f"preparing: topology, {n} messages")
    await helper(impl, args, "_prepare", n)
    phase("prepared; measuring")


async def run_publish(impl: Impl, args: argparse.Namespace) -> dict[str, Any]:
    n = args.n
    await prepare(impl, args, 0)
    async with impl.session(None, publish=True) as pub:
        assert pub is not None
        cpu0, t0, b0 = time.process_time(), time.monotonic(), broker_cpu()
        if args.workload == "publish-seq":
            for i in range(n):
                await pub(i)
        else:
            for start in range(0, n, args.window):
                await publish_window(pub, start, min(n, start + args.window))
        t1, cpu1, b1 = time.monotonic(), time.process_time(), broker_cpu()
    phase("measured; verifying the queue")
    await helper(impl, args, "_verify", n)  # every message on the queue, once
    return {
        "elapsed_s": t1 - t0,
        "rate": n / (t1 - t0),
        "cpu_us_per_msg": (cpu1 - cpu0) / n * 1e6,
        "broker_cpu_us_per_msg": (b1 - b0) / n * 1e6,
    }


async def run_consume(impl: Impl, args: argparse.Namespace) -> dict[str, Any]:
    n = args.n
    await prepare(impl, args, n)
    rec = Recorder(n)
    concurrency = args.concurrency if args.workload == "io" else None
    spec = ConsumeSpec(make_handler(rec, args.sleep), args.prefetch, concurrency)
    async with impl.session(spec, publish=False):
        await rec.wait(30 + n / 500 + (n * args.sleep))
    await expect_empty(impl.url, [impl.queue, *impl.extra_queues])
    return rec.window()


async def run_latency(impl: Impl, args: argparse.Namespace) -> dict[str, Any]:
    """Publish at a fixed rate (each publish confirmed, not awaited in turn) while the
    same process consumes; latency = handler time - publish time in the payload."""
    total = args.warmup + args.n
    rate = args.rate
    await prepare(impl, args, 0)
    rec = Recorder(total, latencies=True)
    spec = ConsumeSpec(make_handler(rec, 0.0), args.prefetch, None)
    loop = asyncio.get_running_loop()
    async with impl.session(spec, publish=True) as pub:
        assert pub is not None
        tasks: list[asyncio.Future[Any]] = []
        cpu0, b0 = time.process_time(), broker_cpu()
        t0 = loop.time()
        sent = 0
        while sent < total:
            due = min(total, int((loop.time() - t0) * rate) + 1)
            while sent < due:
                tasks.append(asyncio.ensure_future(pub(sent)))
                sent += 1
            await asyncio.sleep(max(0.0, t0 + sent / rate - loop.time()))
        t_sent = loop.time()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise BenchFailure(f"{len(errors)} publishes failed, first: {errors[0]!r}")
        await rec.wait(30)
        cpu1, b1 = time.process_time(), broker_cpu()
    await expect_empty(impl.url, [impl.queue, *impl.extra_queues])
    assert rec.latency is not None
    lat = sorted(rec.latency[args.warmup :])
    ms = 1000.0

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * ms

    return {
        "rate": (total - 1) / (t_sent - t0) if t_sent > t0 else 0.0,
        "target_rate": rate,
        "elapsed_s": t_sent - t0,
        "cpu_us_per_msg": (cpu1 - cpu0) / total * 1e6,
        "broker_cpu_us_per_msg": (b1 - b0) / total * 1e6,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] * ms,
        "mean_ms": sum(lat) / len(lat) * ms,
    }


# -- workload 6: banyan with K worker processes on one group --------------------------------


async def run_workers(impl: Impl, args: argparse.Namespace) -> dict[str, Any]:
    """K worker processes of one service consume one group's pre-filled queue.

    Through the real CLI, ``banyan run bench_service:make_bus() --workers K``, when the
    banyan_bus under test has it; else through this module's own ``_worker`` processes
    (one MessageBus consumer each, as ``banyan run --workers`` does)."""
    if impl.name != "banyan":
        raise SystemExit("workload 'workers' is banyan only")
    n, k = args.n, args.workers
    await prepare(impl, args, n)
    if importlib.util.find_spec("banyan_bus.cli") is not None:
        finals, b0, b1 = await _workers_via_cli(impl, args)
        via = "banyan run --workers"
    else:
        finals, b0, b1 = await _workers_via_harness(impl, args)
        via = "harness"
    result = _check_workers(n, k, finals, b0, b1)
    await expect_empty(impl.url, [impl.queue, *impl.extra_queues])
    return result | {"via": via}


async def _workers_via_cli(
    impl: Impl, args: argparse.Namespace
) -> tuple[list[dict[str, Any] | None], float, float]:
    n, k = args.n, args.workers
    folder = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    path = [str(HERE), os.environ.get("BENCH_BANYAN_SRC", ""), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "BENCH_URL": impl.url,
        "BENCH_DIR": str(folder),
        "BENCH_QUEUE_TYPE": impl.queue_type,
        "BENCH_PREFETCH": str(args.prefetch),
        "BENCH_HANDLER_CPU_US": str(args.handler_cpu_us),
    }
    cmd = [sys.executable, "-m", "banyan_bus.cli", "--log-format", "json", "run"]
    cmd += ["bench_service:make_bus()", "--workers", str(k), "--grace", "10"]
    log_path = folder / "cli.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=HERE, env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT
        )

    def cli_log() -> str:
        return log_path.read_text(errors="replace")[-1500:]

    def failed(what: str) -> Exception:
        """A worker that could not reach the broker measured nothing: infrastructure
        (run.py retries it), not a wrong result."""
        text = cli_log()
        if "cannot connect to RabbitMQ" in text:
            return ConnectionError(f"{what}: a worker could not reach the broker:\n{text}")
        return BenchFailure(f"{what}:\n{text}")

    def count(prefix: str) -> list[Path]:
        return [p for p in folder.iterdir() if p.name.startswith(prefix) and "tmp" not in p.name]

    try:
        deadline = time.monotonic() + 60
        while len(count("ready.")) < k:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise failed(f"banyan run did not start {k} workers")
            await asyncio.sleep(0.05)
        b0 = broker_cpu()
        (folder / "go").touch()
        deadline = time.monotonic() + 30 + n / 500
        while True:
            done = 0
            for p in count("progress."):
                with contextlib.suppress(OSError, ValueError):
                    done += int(p.read_text() or 0)
            if done >= n:
                break
            if proc.returncode is not None or time.monotonic() > deadline:
                raise failed(f"workers handled {done} of {n}")
            await asyncio.sleep(0.05)
        b1 = broker_cpu()
        proc.send_signal(signal.SIGTERM)  # graceful stop, as an orchestrator would
        async with asyncio.timeout(60):
            code = await proc.wait()
        if code != 0:
            raise failed(f"banyan run exited {code}")
        finals: list[dict[str, Any] | None] = [json.loads(p.read_text()) for p in count("result.")]
        if len(finals) != k:
            raise BenchFailure(f"{len(finals)} worker results for {k} workers:\n{cli_log()}")
        return finals, b0, b1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


async def _workers_via_harness(
    impl: Impl, args: argparse.Namespace
) -> tuple[list[dict[str, Any] | None], float, float]:
    n, k = args.n, args.workers
    cmd = [sys.executable, str(HERE / "workloads.py"), "banyan", "_worker", "--n", str(n)]
    cmd += ["--prefetch", str(args.prefetch), "--url", impl.url]
    cmd += ["--queue-type", args.queue_type]
    procs = [
        await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,  # the final line lists every seq the worker handled
        )
        for _ in range(k)
    ]
    counts = [0] * k
    finals: list[dict[str, Any] | None] = [None] * k

    async def read(i: int, proc: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode().strip()
            if line == "READY":
                ready.set()
            elif line.startswith("PROGRESS "):
                counts[i] = int(line.split()[1])
            elif line.startswith(RESULT_MARK):
                finals[i] = json.loads(line[len(RESULT_MARK) :])

    readies = [asyncio.Event() for _ in procs]
    readers = [asyncio.create_task(read(i, p, readies[i])) for i, p in enumerate(procs)]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(r.wait() for r in readies))
        b0 = broker_cpu()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        deadline = time.monotonic() + 30 + n / 500
        while sum(counts) < n:
            if time.monotonic() > deadline:
                raise BenchFailure(f"workers handled only {counts} of {n}")
            if any(p.returncode is not None for p in procs):
                raise BenchFailure(f"a worker exited early: {[p.returncode for p in procs]}")
            await asyncio.sleep(0.05)
        b1 = broker_cpu()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"stop\n")
            await p.stdin.drain()
        async with asyncio.timeout(60):
            codes = [await p.wait() for p in procs]
            await asyncio.gather(*readers)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    if any(codes):
        raise BenchFailure(f"worker failed: exit codes {codes}")
    return finals, b0, b1


def _check_workers(
    n: int, k: int, finals: list[dict[str, Any] | None], b0: float, b1: float
) -> dict[str, Any]:
    """Every message handled exactly once across the workers; throughput over the span
    from the first message any worker handled to the last."""
    if any(f is None or not f.get("ok") for f in finals):
        raise BenchFailure(f"a worker reported no result or a failure: {finals}")
    results = [f for f in finals if f is not None]
    seen = bytearray(n)
    for f in results:
        for seq in f["seqs"]:
            if not 0 <= seq < n or seen[seq]:
                raise BenchFailure(f"seq {seq} handled twice or unexpected across workers")
            seen[seq] = 1
    total = sum(f["count"] for f in results)
    if total != n or not all(seen):
        raise BenchFailure(f"workers handled {total} distinct messages, expected {n}")
    active = [f for f in results if f["count"]]
    span = max(f["t_last"] for f in active) - min(f["t_first"] for f in active)
    cpu = sum(f["cpu_last"] - f["cpu_first"] for f in active)
    return {
        "elapsed_s": span,
        "rate": (n - 1) / span,
        "cpu_us_per_msg": cpu / n * 1e6,
        "broker_cpu_us_per_msg": (b1 - b0) / n * 1e6,  # from "go" to the last progress
        "workers": k,
        "per_worker": [f["count"] for f in results],
    }


async def worker_main(args: argparse.Namespace) -> int:
    """A worker process: a MessageBus consumer of the group, started on ``go``."""
    impl = Banyan(args.url, args.queue_type)
    n = args.n
    seen: list[int] = []
    state = {"t_first": 0.0, "t_last": 0.0, "cpu_first": 0.0, "cpu_last": 0.0}

    async def handle(event: Any) -> None:
        now = time.monotonic()
        if not seen:
            state["t_first"], state["cpu_first"] = now, time.process_time()
        seen.append(event.seq)
        state["t_last"], state["cpu_last"] = now, time.process_time()

    loop = asyncio.get_running_loop()
    bus = impl.bus()
    async with bus:
        print("READY", flush=True)
        if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
            return 1
        await bus.subscribe(
            impl.contract,
            handle,
            subscription_group=GROUP,
            concurrency=args.prefetch,
            prefetch=args.prefetch,
        )
        stop = asyncio.ensure_future(loop.run_in_executor(None, sys.stdin.readline))
        while not stop.done():
            print(f"PROGRESS {len(seen)}", flush=True)
            await asyncio.wait({stop}, timeout=0.05)
        await bus.wait_idle(10)
    result = {"ok": True, "count": len(seen), "seqs": seen, **state, "n": n}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("impl", choices=IMPLS)
    p.add_argument("workload", choices=(*WORKLOADS, *HELPERS))
    p.add_argument("--n", type=int, required=True, help="messages (latency: measured ones)")
    p.add_argument("--prefetch", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=50, help="io workload only")
    p.add_argument("--sleep", type=float, default=0.0, help="handler sleep, s (io: 0.01)")
    p.add_argument("--window", type=int, default=500, help="publishes in flight (pipelined)")
    p.add_argument("--rate", type=float, default=1000.0, help="latency: msg/s")
    p.add_argument("--warmup", type=int, default=500, help="latency: unmeasured first msgs")
    p.add_argument("--workers", type=int, default=1, help="workers: processes")
    p.add_argument(
        "--handler-cpu-us", type=int, default=0, help="workers: CPU µs the handler burns per msg"
    )
    p.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    p.add_argument("--url", help=argparse.SUPPRESS)  # helpers: the run's vhost URL
    p.add_argument("--vhost", help="vhost name (default: a new unique one)")
    p.add_argument("--keep-vhost", action="store_true", help="leave the vhost for inspection")
    args = p.parse_args(argv)
    if args.workload == "io" and args.sleep == 0.0:
        args.sleep = 0.01
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    vhost = args.vhost or f"bench-{args.impl}-{args.workload}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    phase(f"creating vhost {vhost}")
    url = vhosts.create_vhost(vhost)
    phase("vhost created")
    try:
        impl = make_impl(args.impl, url, args.queue_type)
        if args.workload in ("publish-seq", "publish-pipe"):
            return await run_publish(impl, args)
        if args.workload in ("consume", "io"):
            return await run_consume(impl, args)
        if args.workload == "latency":
            return await run_latency(impl, args)
        return await run_workers(impl, args)
    finally:
        if not args.keep_vhost:
            try:
                phase("deleting vhost")
                vhosts.delete_vhost(vhost)
                phase("vhost deleted")
            except vhosts.BrokerAdminError as exc:
                print(f"warning: vhost {vhost} left behind: {exc}", file=sys.stderr)


async def helper_main(args: argparse.Namespace) -> dict[str, Any]:
    impl = make_impl(args.impl, args.url, args.queue_type)
    if args.workload == "_prepare":
        await impl.setup()
        if args.n:
            await fill(impl, args.n)
    else:
        await drain_and_verify(impl.url, impl.queue, args.n, impl.seq_of)
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workload == "_worker":
        return asyncio.run(worker_main(args))
    params = {
        k: getattr(args, k)
        for k in ("prefetch", "concurrency", "sleep", "window", "rate", "warmup", "workers")
    }
    head = {
        "impl": args.impl,
        "workload": args.workload,
        "n": args.n,
        "queue_type": args.queue_type,
    }
    entry = helper_main if args.workload in HELPERS else main_async
    try:
        result = asyncio.run(entry(args))
    except BenchFailure as exc:
        print(RESULT_MARK + json.dumps({**head, "ok": False, "error": str(exc)}), flush=True)
        print(f"BENCHMARK RUN FAILED ({args.impl} {args.workload}): {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        traceback.print_exc()
        infra = broker_trouble(exc)
        error = f"{'infrastructure: ' if infra else ''}{type(exc).__name__}: {exc}"
        print(RESULT_MARK + json.dumps({**head, "ok": False, "error": error}), flush=True)
        return EXIT_INFRA if infra else EXIT_FAILED
    if args.impl == "banyan":
        result["banyan_bus"] = str(Path(sys.modules["banyan_bus"].__file__ or "?").parent)
    print(RESULT_MARK + json.dumps({**head, "ok": True, "params": params, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
