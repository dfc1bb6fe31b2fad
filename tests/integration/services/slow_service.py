"""A test-only service whose handler takes as long as its event asks (``banyan run`` tests).

``WorkRequested(job_id="a", seconds=3)`` keeps the handler busy for 3 s, so a
test can send SIGTERM while it is in flight; ``fail=True`` makes it raise at
once, with no retries, so the message lands in the dead-letter queue.
"""

from __future__ import annotations

import asyncio

import structlog

from banyan_bus import Event, MessageBus, MessageContext, RetryPolicy

SERVICE = "slow-service"


class WorkRequested(Event):
    job_id: str
    seconds: float = 0.0
    fail: bool = False


class JobFailed(Exception):
    pass


log = structlog.get_logger("tests.slow_service").bind(group=SERVICE)


async def work(event: WorkRequested, ctx: MessageContext) -> None:
    log.info("work_started", job_id=event.job_id, event_id=ctx.id)
    if event.fail:
        raise JobFailed(f"job {event.job_id} failed on purpose")
    await asyncio.sleep(event.seconds)
    log.info("work_finished", job_id=event.job_id, event_id=ctx.id)


# One at a time and one unacked at a time: a second job waits in the queue, where
# a test can count it after shutdown.
bus = MessageBus(SERVICE)
bus.handler(WorkRequested, concurrency=1, prefetch=1, retry=RetryPolicy.none())(work)
