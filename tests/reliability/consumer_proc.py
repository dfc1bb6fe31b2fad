"""A consumer process for the reliability suite (SIGKILL, ordering, idempotency and soak).

    python -m tests.reliability.consumer_proc --url URL --group G --run R --out FILE
        [--starts FILE] [--concurrency 10] [--prefetch N] [--delay SECONDS] [--ready FILE]
        [--ordered --partitions P] [--redis-url URL --redis-prefix P] [--timeout S]

Subscribes group ``G`` to ``ReliabilityTicked``. For each event of run ``R`` the handler
appends ``"<n> <unix time>"`` to ``--starts`` when it begins and to ``FILE`` when it ends
(each flushed per line, so in the kernel before the next step and before the ack: a
SIGKILL loses neither; an exception or cancellation around the side effect is written to
``--starts`` as a ``#`` comment line). Between the two it sleeps ``--delay`` s (the work a kill can
interrupt).

``--ordered``: an ordered subscription (``ordered=True``, ``--partitions`` queues); the
publisher gives each event its partition key. ``--redis-url``: an idempotent
subscription through ``RedisIdempotencyStore`` (keys under ``<--redis-prefix>idem:``), and the
handler's side effect is ``INCR <prefix>effect:<n>`` after the delay (a counter per event
that must end at 1), recorded to ``FILE`` only once done.

Writes ``--ready`` once consuming. Stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from banyan_bus import MessageBus, RetryPolicy  # noqa: E402
from tests.reliability.harness import ReliabilityTicked  # noqa: E402


def effect_key(prefix: str, n: int) -> str:
    return f"{prefix}effect:{n}"


async def main(args: argparse.Namespace) -> None:
    out = open(args.out, "a", buffering=1)  # noqa: ASYNC230 - one open for the process life
    starts = open(args.starts, "a", buffering=1) if args.starts else None  # noqa: ASYNC230
    delay: float = args.delay
    store: Any = None
    effects: Any = None
    if args.redis_url:
        import redis.asyncio

        from banyan_bus.idempotency_redis import RedisIdempotencyStore

        store = RedisIdempotencyStore(args.redis_url, prefix=args.redis_prefix + "idem:")
        effects = redis.asyncio.Redis.from_url(args.redis_url)

    async def handle(event: ReliabilityTicked) -> None:
        if event.run != args.run:
            return
        if starts is not None:
            starts.write(f"{event.n} {time.time():.6f}\n")
        if delay:
            await asyncio.sleep(delay)
        if effects is not None:
            try:
                await effects.incr(effect_key(args.redis_prefix, event.n))
            except BaseException as exc:  # a side effect that may or may not have happened
                if starts is not None:
                    starts.write(f"# {event.n} {time.time():.6f} {type(exc).__name__}: {exc}\n")
                raise
        out.write(f"{event.n} {time.time():.6f}\n")

    bus_opts: dict[str, Any] = {"grace_period": 2.0}
    if store is not None:
        bus_opts["idempotency_store"] = store
    bus = MessageBus(args.group, args.url, **bus_opts)
    sub_opts: dict[str, Any] = {"concurrency": args.concurrency, "prefetch": args.prefetch}
    if args.ordered:
        sub_opts.update(ordered=True, partitions=args.partitions)
    if store is not None:
        sub_opts["idempotent"] = True
    if args.timeout is not None:
        # A short handler timeout (and no immediate retry) keeps the idempotency lease of a
        # killed handler short: attempt x (1 + immediate) + 30 s (subscription.py).
        sub_opts.update(timeout=args.timeout, retry=RetryPolicy(immediate=0, delayed=5))
    await bus.subscribe(ReliabilityTicked, handle, **sub_opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with bus:
        if args.ready:
            Path(args.ready).write_text("ready\n")  # noqa: ASYNC240
        await stop.wait()
    out.close()
    if starts is not None:
        starts.close()
    if effects is not None:
        await effects.aclose()
    if store is not None:
        await store.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--starts", default=None)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--prefetch", type=int, default=None)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--ready", default=None)
    p.add_argument("--ordered", action="store_true")
    p.add_argument("--partitions", type=int, default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--redis-prefix", default="banyan-reliability:")
    p.add_argument("--timeout", type=float, default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
