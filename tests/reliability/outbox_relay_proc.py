"""An outbox relay process for the reliability suite (scenario 11).

    python -m tests.reliability.outbox_relay_proc --url URL --postgres DSN --schema S
        --log FILE --ready FILE [--batch-size 50] [--publish-timeout 5] [--max-backoff 1]
        [--kill-at-mark K --marker FILE]

Runs :class:`banyan_bus.outbox.OutboxRelay` on the PostgreSQL event store in schema ``S``
(events are ``ReliabilityTicked``). Every publish attempt is appended to ``--log``, flushed
per line: ``P <n> <stream> <time>`` once the broker confirmed it, ``F <n> <stream> <time>
<error>`` when it raised; ``B <batch> <rows> <confirmed> <time>`` when a batch is about to
be marked sent.

``--kill-at-mark K``: the relay SIGKILLs itself in its K-th ``_mark_sent`` -- after the
batch's publishes were confirmed, before ``sent_at`` is written: the outbox's
at-least-once seam, hit deterministically. First it writes ``--marker`` (JSON: the batch's
numbers, the confirmed ones that stay unmarked, the time), fsynced.

Writes ``--ready`` once the bus is connected. Stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from banyan_bus import MessageBus  # noqa: E402
from banyan_bus.eventstore import OutboxBatch, PostgresEventStore  # noqa: E402
from banyan_bus.outbox import OutboxRelay  # noqa: E402
from tests.reliability.harness import ReliabilityTicked  # noqa: E402


class RecordingBus(MessageBus):
    """Notes each publish the relay makes, and how it ended."""

    log: TextIO

    async def publish(self, message: Any, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        n = message.n if isinstance(message, ReliabilityTicked) else -1
        stream = kwargs.get("partition_key")
        try:
            message_id: str = await super().publish(message, *args, **kwargs)
        except BaseException as exc:
            self.log.write(f"F {n} {stream} {time.time():.6f} {type(exc).__name__}\n")
            raise
        self.log.write(f"P {n} {stream} {time.time():.6f}\n")
        return message_id


class KillableRelay(OutboxRelay):
    """Dies (SIGKILL) in its ``kill_at``-th ``_mark_sent``, if ``kill_at`` is set."""

    def __init__(self, *args: Any, log: TextIO, kill_at: int, marker: str | None, **kw: Any):
        super().__init__(*args, **kw)
        self.log = log
        self.kill_at = kill_at
        self.marker = marker
        self.batches = 0

    async def _mark_sent(self, batch: OutboxBatch, positions: Sequence[int]) -> None:
        self.batches += 1
        self.log.write(f"B {self.batches} {len(batch.rows)} {len(positions)} {time.time():.6f}\n")
        if self.batches == self.kill_at and self.marker:
            done = set(positions)
            record = {
                "batch": [r.payload["n"] for r in batch.rows],
                "unmarked": [r.payload["n"] for r in batch.rows if r.position in done],
                "streams": sorted({r.ordering_key for r in batch.rows}),
                "time": time.time(),
            }
            with open(self.marker, "w") as f:  # noqa: ASYNC230 - the process dies next
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        await super()._mark_sent(batch, positions)


async def main(args: argparse.Namespace) -> None:
    log = open(args.log, "a", buffering=1)  # noqa: ASYNC230 - one open for the process life
    store = PostgresEventStore(args.postgres, schema=args.schema, max_size=4)
    await store.open()
    bus = RecordingBus(args.service, args.url, publish_timeout=args.publish_timeout)
    bus.log = log
    relay = KillableRelay(
        store,
        bus,
        log=log,
        kill_at=args.kill_at_mark,
        marker=args.marker,
        batch_size=args.batch_size,
        poll_interval=0.05,
        max_backoff=args.max_backoff,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    try:
        async with bus:
            Path(args.ready).write_text("ready\n")  # noqa: ASYNC240
            await relay.run()
    finally:
        await store.close()
        log.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--postgres", required=True)
    p.add_argument("--schema", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("--service", default="rel-outbox-relay")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--publish-timeout", type=float, default=5.0)
    p.add_argument("--max-backoff", type=float, default=1.0)
    p.add_argument("--kill-at-mark", type=int, default=0)
    p.add_argument("--marker", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
