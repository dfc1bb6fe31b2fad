"""Helpers for the one-process demos (``all_in_one.py``): readable output, waiting for quiet.

Not needed by services: ``banyan run`` configures logging itself, and a real
deployment never waits for the whole platform to be idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import MutableMapping, Sequence
from typing import Any

import structlog

from banyan_bus import MessageBus
from banyan_bus.topology import DLQ_PREFIX, QueueDecl

# Framework chatter that says nothing about what the services did.
_QUIET_EVENTS = frozenset({"bus_started", "bus_stopped"})
# Context every handler log line carries; useful in production, noise in a demo.
_CONTEXT_KEYS = frozenset(
    {
        "event",
        "level",
        "timestamp",
        "group",
        "service",
        "handler",
        "event_id",
        "message_id",
        "correlation_id",
        "message_type",
        "attempt",
        "logger",
        "version",
        "causation_id",
        "trace_id",
        "span_id",
    }
)


def demo_url(story: str) -> str:
    """A private in-process broker for the demo, and one line saying so.

    The demo runs every service of the story in one process, on ``memory://``,
    whatever ``BANYAN_URL`` says: on a shared RabbitMQ vhost its services would
    compete with the same example services run by ``banyan run``. To see them
    on RabbitMQ, run each service with ``banyan run`` instead.
    """
    url = f"memory://{story}-demo-{uuid.uuid4().hex[:8]}"
    ignored = os.environ.get("BANYAN_URL")
    note = (
        f" (BANYAN_URL is ignored: to use RabbitMQ run each service with `banyan run "
        f"examples.{story}.<service>:bus`)"
        if ignored and not ignored.startswith("memory:")
        else ""
    )
    print(line("demo", "running on memory://", broker="in-process") + note)
    return url


def line(who: str, what: str, **details: Any) -> str:
    """``who`` in a column, then what happened and its details: one line per action."""
    extra = " ".join(f"{k}={v}" for k, v in details.items())
    return f"{who:<22} {what:<22} {extra}".rstrip()


def _render(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    who = str(event_dict.get("group") or event_dict.get("service") or "banyan_bus")
    # What the framework binds for every message (trace ids, versions ...) is context,
    # not the action: show only what the handler said.
    bound = set(structlog.contextvars.get_contextvars())
    details = {
        k: v
        for k, v in event_dict.items()
        if k not in _CONTEXT_KEYS and k not in bound and v is not None
    }
    return line(who, str(event_dict.get("event", "")), **details)


def _drop_chatter(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    if event_dict.get("event") in _QUIET_EVENTS:
        raise structlog.DropEvent
    return event_dict


def configure_demo_logging() -> None:
    """Print each service's log lines as ``service  event  key=value``, nothing else."""
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, _drop_chatter, _render],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )


async def settle(buses: Sequence[MessageBus], *, timeout: float = 15.0) -> None:
    """Wait until no handler runs and every queue the buses use is empty (retries included).

    Checked twice in a row, because a message can be between two queues (or
    between a queue and its handler) for a moment.
    """
    queues: list[tuple[MessageBus, str]] = [
        (bus, decl.name)
        for bus in buses
        for decl in bus.topology()
        if isinstance(decl, QueueDecl) and not decl.name.startswith(DLQ_PREFIX)
    ]
    async with asyncio.timeout(timeout):
        quiet = 0
        while quiet < 2:
            await asyncio.sleep(0.02)
            busy = not all([await bus.wait_idle(0) for bus in buses])
            for bus, name in queues:
                state = await bus.transport.queue_state(name)
                busy = busy or (state is not None and state.messages > 0)
            quiet = 0 if busy else quiet + 1
