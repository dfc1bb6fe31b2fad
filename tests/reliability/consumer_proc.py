"""A consumer process for the reliability suite (SIGKILL and soak scenarios).

    python -m tests.reliability.consumer_proc --url URL --group G --run R --out FILE
        [--concurrency 10] [--prefetch N] [--delay SECONDS] [--ready FILE]

Subscribes group ``G`` to ``ReliabilityTicked``; each handled event of run ``R`` appends
``"<n> <unix time>"`` to ``FILE`` (flushed per line, before the handler returns, so before
the ack). Writes ``FILE --ready`` once consuming. Stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from banyan_bus import MessageBus  # noqa: E402
from tests.reliability.harness import ReliabilityTicked  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    out = open(args.out, "a", buffering=1)  # noqa: ASYNC230 - one open for the process life
    delay: float = args.delay

    async def handle(event: ReliabilityTicked) -> None:
        if event.run != args.run:
            return
        if delay:
            await asyncio.sleep(delay)
        out.write(f"{event.n} {time.time():.6f}\n")
        out.flush()

    bus = MessageBus(args.group, args.url, grace_period=2.0)
    await bus.subscribe(
        ReliabilityTicked, handle, concurrency=args.concurrency, prefetch=args.prefetch
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with bus:
        if args.ready:
            Path(args.ready).write_text("ready\n")  # noqa: ASYNC240
        await stop.wait()
    out.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--prefetch", type=int, default=None)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--ready", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
