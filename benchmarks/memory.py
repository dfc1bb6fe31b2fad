"""Memory per in-flight message and per idle subscription; prints one ``BENCH_RESULT {json}``.

::

    python benchmarks/memory.py IMPL inflight --n 1000 --payload-bytes 1024
    python benchmarks/memory.py IMPL inflight --n 1000 --payload-bytes 262144
    python benchmarks/memory.py IMPL idle --n 200

IMPL is ``aiormq`` (the floor), ``raw``, ``faststream`` or ``banyan`` for ``inflight``;
``aiormq`` or ``banyan`` for ``idle``. Each run is a fresh process on a vhost of its own
on the real broker (``run.py --only memory`` runs them with the other workloads).

* ``inflight``: the process consumes with prefetch ``--n`` (banyan: concurrency = prefetch)
  and a handler that blocks on an event, so all ``--n`` deliveries are held at once. A
  warm-up of ``--warmup`` messages is handled (and acked) first; then the resident set
  (RSS, after ``gc.collect()``) is read, another process publishes ``--n`` messages of
  ``--payload-bytes`` of JSON, and once every one is held by a blocked handler RSS is
  read again: ``(after - before) / n`` is the memory an in-flight message costs. What is
  beyond the AMQP body (the envelope's for banyan, the bare payload for the others)
  includes the decoded payload model, which every implementation holds alike; the
  difference to ``aiormq`` is what the framework adds.
* ``idle``: RSS with two subscriptions running (one started with the connection, one
  added after it), then after ``--n`` more (banyan: ``bus.subscribe`` of the benchmark's
  event in ``--n`` more groups, each its own queue, DLQ and consumer channel, with the
  default prefetch; aiormq: a quorum queue bound to the exchange, a channel with
  prefetch 30 and a ``basic_consume`` each): ``(after - before) / n``.

Every run checks its counts: ``inflight`` handles each message exactly once (warm-up
and held ones), leaves the queue (and banyan's DLQ) empty; ``idle`` publishes one
message afterwards that every subscription must handle exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vhosts  # noqa: E402
import workloads as wl  # noqa: E402

RESULT_MARK = wl.RESULT_MARK
IMPLS = ("aiormq", "raw", "faststream", "banyan")
IDLE_IMPLS = ("aiormq", "banyan")
IDLE_PREFETCH = 30  # banyan's default prefetch (3 x the default concurrency of 10)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """This process's resident set, in bytes, after a full garbage collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


async def settle_then_rss(pause: float = 0.3) -> int:
    """RSS once the loop has had a moment to write what it owes (acks, frames)."""
    await asyncio.sleep(pause)
    return rss()


def body_bytes(impl: wl.Impl) -> int:
    """Bytes of one AMQP body as this implementation sends it."""
    payload = wl.Payload(**wl.fields(0, time.time()))
    if isinstance(impl, wl.Banyan):
        from banyan_bus.envelope import encode

        event = impl.contract(**wl.fields(0, time.time()))
        return len(encode(event, service_name=wl.GROUP, max_size=1 << 30).body)
    return len(payload.model_dump_json().encode())


async def wait_for(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise wl.BenchFailure(f"timed out after {timeout:.0f}s waiting for {what()}")
        await asyncio.sleep(0.02)


# -- in-flight messages ----------------------------------------------------------------------


async def publisher(impl: wl.Impl, args: argparse.Namespace, start: int, n: int) -> None:
    """Publish seqs start..start+n-1 from another process (nothing of it in this one's RSS)."""
    cmd = [sys.executable, str(HERE / "memory.py"), impl.name, "_publish", "--n", str(n)]
    cmd += ["--start", str(start), "--url", impl.url, "--queue-type", impl.queue_type]
    cmd += ["--payload-bytes", str(args.payload_bytes)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        text = f"publishing {n} messages failed:\n{err.decode()[-1500:]}"
        if proc.returncode == wl.EXIT_INFRA:  # it could not reach the broker: retried
            raise ConnectionError(text)
        raise wl.BenchFailure(text)


async def publish_main(args: argparse.Namespace) -> dict[str, Any]:
    impl = wl.make_impl(args.impl, args.url, args.queue_type)
    window = max(1, min(500, (8 << 20) // max(1, args.payload_bytes)))
    async with impl.session(None, publish=True) as pub:
        assert pub is not None
        for s in range(args.start, args.start + args.n, window):
            await wl.publish_window(pub, s, min(args.start + args.n, s + window))
    return {}


async def run_inflight(impl: wl.Impl, args: argparse.Namespace) -> dict[str, Any]:
    n, warmup = args.n, args.warmup
    await wl.prepare(impl, args, 0)  # the topology, in another process
    rec = wl.Recorder(warmup + n)
    release = asyncio.Event()
    held = 0

    async def handle(event: Any) -> None:
        nonlocal held
        rec.hit(event.seq)
        if event.seq >= warmup:
            held += 1
            await release.wait()

    # prefetch n and no other bound: all n deliveries can be held at once
    spec = wl.ConsumeSpec(handle, n, None)
    async with impl.session(spec, publish=False):
        await publisher(impl, args, 0, warmup)
        await wait_for(lambda: rec.count >= warmup, 60, lambda: f"warm-up {rec.count}/{warmup}")
        before = await settle_then_rss()
        wl.phase(f"warmed up; RSS {before / 2**20:.1f} MiB; publishing {n}")
        await publisher(impl, args, warmup, n)
        await wait_for(
            lambda: held >= n,
            60 + n * args.payload_bytes / 2e6,
            lambda: f"{held}/{n} deliveries held (errors: {rec.errors[:3]})",
        )
        after = await settle_then_rss()
        wl.phase(f"{held} held; RSS {after / 2**20:.1f} MiB")
        if held != n:
            raise wl.BenchFailure(f"{held} deliveries held, expected {n}")
        release.set()
        await rec.wait(60)
    await wl.expect_empty(impl.url, [impl.queue, *impl.extra_queues])
    per = (after - before) / n
    body = body_bytes(impl)
    return {
        "unit": "in-flight message",
        "count": n,
        "payload_bytes": args.payload_bytes,
        "body_bytes": body,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "kib_per_unit": per / 1024,
        "beyond_body_kib": (per - body) / 1024,
    }


# -- idle subscriptions ----------------------------------------------------------------------


class Counts:
    """Which subscription handled the check message, how often."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.hits: dict[int, int] = {}

    def handler(self, i: int) -> Callable[[Any], Any]:
        async def handle(event: Any) -> None:
            self.hits[i] = self.hits.get(i, 0) + 1

        return handle

    def check(self) -> None:
        twice = [i for i, c in self.hits.items() if c != 1]
        missing = self.total - len(self.hits)
        if twice or missing:
            raise wl.BenchFailure(
                f"check message: {missing} of {self.total} subscriptions never handled it, "
                f"{len(twice)} handled it more than once ({twice[:5]})"
            )


async def run_idle(impl: wl.Impl, args: argparse.Namespace) -> dict[str, Any]:
    if impl.name not in IDLE_IMPLS:
        raise SystemExit(f"idle: one of {IDLE_IMPLS}")
    await wl.prepare(impl, args, 0)
    counts = Counts(args.n + 2)
    add: Callable[[int], Any]
    publish: Callable[[], Any]
    async with _idle_session(impl, counts) as (add, publish):
        for i in range(2):  # warm: the first one started with the connection, one after
            await add(i)
        before = await settle_then_rss()
        wl.phase(f"2 subscriptions; RSS {before / 2**20:.1f} MiB; adding {args.n}")
        t0 = time.monotonic()
        for i in range(2, args.n + 2):
            await add(i)
        took = time.monotonic() - t0
        after = await settle_then_rss()
        wl.phase(f"{args.n + 2} subscriptions ({took:.1f}s); RSS {after / 2**20:.1f} MiB")
        await publish()
        await wait_for(
            lambda: len(counts.hits) >= counts.total,
            30,
            lambda: f"{len(counts.hits)}/{counts.total} subscriptions handling the check message",
        )
        await asyncio.sleep(0.3)  # a duplicate would show by now
        counts.check()
    return {
        "unit": "idle subscription",
        "count": args.n,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "kib_per_unit": (after - before) / args.n / 1024,
        "subscribe_s": took,
    }


@contextlib.asynccontextmanager
async def _idle_session(impl: wl.Impl, counts: Counts) -> AsyncIterator[tuple[Any, Any]]:
    if isinstance(impl, wl.Banyan):
        bus = impl.bus()
        contract = impl.contract
        await bus.subscribe(contract, counts.handler(0), subscription_group=wl.GROUP)
        async with bus:

            async def add(i: int) -> None:
                if i:  # 0 started with the bus
                    group = f"idle{i:04d}"
                    await bus.subscribe(contract, counts.handler(i), subscription_group=group)

            async def publish() -> None:
                await bus.publish(contract(**wl.fields(0, time.time())))

            yield add, publish
        return

    import aiormq

    conn = await aiormq.connect(impl.url)
    try:
        declare = await conn.channel()
        confirm = await conn.channel(publisher_confirms=True)
        arguments = {"x-queue-type": "quorum"} if impl.queue_type == "quorum" else None

        async def add(i: int) -> None:
            queue = wl.QUEUE if i == 0 else f"{wl.QUEUE}.idle{i:04d}"
            if i:
                await declare.queue_declare(queue, durable=True, arguments=arguments)
                await declare.queue_bind(queue, wl.EXCHANGE, routing_key=wl.ROUTING_KEY)
            channel = await conn.channel()
            await channel.basic_qos(prefetch_count=IDLE_PREFETCH)
            handler = counts.handler(i)

            async def on_message(message: Any) -> None:
                await handler(wl.Payload.model_validate_json(message.body))
                await message.channel.basic_ack(message.delivery.delivery_tag)

            await channel.basic_consume(queue, on_message, no_ack=False)

        async def publish() -> None:
            body = wl.Payload(**wl.fields(0, time.time())).model_dump_json().encode()
            await confirm.basic_publish(body, exchange=wl.EXCHANGE, routing_key=wl.ROUTING_KEY)

        yield add, publish
    finally:
        await conn.close()


# -- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("impl", choices=IMPLS)
    p.add_argument("workload", choices=("inflight", "idle", "_publish"))
    p.add_argument("--n", type=int, required=True, help="held messages / idle subscriptions")
    p.add_argument("--payload-bytes", type=int, default=wl.PAYLOAD_BYTES)
    p.add_argument("--warmup", type=int, default=50, help="inflight: messages handled first")
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)  # _publish
    p.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    p.add_argument("--url", help=argparse.SUPPRESS)  # _publish: the run's vhost URL
    p.add_argument("--vhost", help="vhost name (default: a new unique one)")
    return p.parse_args(argv)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.workload == "_publish":
        return await publish_main(args)
    vhost = args.vhost or f"bench-mem-{args.impl}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    wl.phase(f"creating vhost {vhost}")
    url = vhosts.create_vhost(vhost)
    try:
        impl = wl.make_impl(args.impl, url, args.queue_type)
        if args.workload == "inflight":
            return await run_inflight(impl, args)
        return await run_idle(impl, args)
    finally:
        try:
            wl.phase("deleting vhost")
            vhosts.delete_vhost(vhost)
        except vhosts.BrokerAdminError as exc:
            print(f"warning: vhost {vhost} left behind: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wl.set_payload_bytes(args.payload_bytes)
    head = {"impl": args.impl, "workload": f"memory-{args.workload}", "n": args.n}
    try:
        result = asyncio.run(main_async(args))
    except wl.BenchFailure as exc:
        print(RESULT_MARK + json.dumps({**head, "ok": False, "error": str(exc)}), flush=True)
        print(f"BENCHMARK RUN FAILED ({args.impl} {args.workload}): {exc}", file=sys.stderr)
        return wl.EXIT_FAILED
    except Exception as exc:
        traceback.print_exc()
        infra = wl.broker_trouble(exc)
        error = f"{'infrastructure: ' if infra else ''}{type(exc).__name__}: {exc}"
        print(RESULT_MARK + json.dumps({**head, "ok": False, "error": error}), flush=True)
        return wl.EXIT_INFRA if infra else wl.EXIT_FAILED
    print(RESULT_MARK + json.dumps({**head, "ok": True, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
