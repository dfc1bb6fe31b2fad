"""``bus.health()``: is this service connected, consuming, and is the broker answering?

What an orchestrator needs to tell a wedged consumer from a working one, as one
typed report:

- ``state``: ``starting``, ``running``, ``draining`` (``stop()`` was called: no new
  messages are taken, in-flight handlers finish) or ``stopped``;
- ``connected``: the transport's connection is open (False while the AMQP
  transport reconnects);
- ``consumers``: each subscription (and command queue) with whether every one of
  its queues has a live consumer on this connection;
- a broker round-trip: one confirmed publish of an empty message to the default
  exchange with a routing key no queue has, so the broker drops it. It proves
  more than a heartbeat: the broker reads this connection, and publish confirms
  come back (a memory or disk alarm blocks a publishing connection, and this
  probe then times out). ``round_trip_s`` is how long it took,
  ``last_round_trip`` when the broker last answered one.

Why two verdicts: ``ready`` (running, connected, every consumer consuming) is what
a readiness probe should act on, since it changes while the broker reconnects or
the service drains; ``healthy`` adds that confirms flow. A failed round-trip alone
does not make a service unready: a slow broker under load answers late, and
flapping readiness would only move work around.

The checks are local and cheap except the round-trip, which runs at most once a
second however many probes ask (callers within that second share its answer).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeAlias

from banyan_bus.errors import BanyanError
from banyan_bus.transport.base import DEFAULT_EXCHANGE, OutgoingMessage, Transport

BusState: TypeAlias = Literal["stopped", "starting", "running", "draining"]

#: The routing key of the probe: no queue is named so, so the default exchange drops it.
PROBE_ROUTING_KEY = "banyan.health-probe"
#: Probes within this many seconds of the last one reuse its answer.
PROBE_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class ConsumerHealth:
    """One subscription (``kind="event"``) or owned command/query queue (``kind="command"``)."""

    kind: Literal["event", "command"]
    group: str
    message_type: str
    queues: tuple[str, ...]
    #: Every one of ``queues`` has a consumer of this connection taking its messages.
    consuming: bool


@dataclass(frozen=True, slots=True)
class HealthReport:
    """A snapshot of a bus's health: see the module docstring for what each field means.

    Example::

        report = await bus.health()
        if not report.ready:
            print(report.problems)
    """

    service: str
    state: BusState
    connected: bool
    consumers: tuple[ConsumerHealth, ...]
    #: Seconds the probe's confirmed publish took just now; None if it failed or was not tried.
    round_trip_s: float | None
    #: When the broker last answered a probe (UTC), whether or not it answered this time.
    last_round_trip: datetime | None
    #: The probe's publish was confirmed (False when not connected or it failed).
    confirms_flowing: bool
    #: Why the service is not ready or not healthy, one short sentence each.
    problems: tuple[str, ...] = field(default=())

    @property
    def ready(self) -> bool:
        """Running, connected and every consumer consuming: take traffic."""
        return (
            self.state == "running"
            and self.connected
            and all(consumer.consuming for consumer in self.consumers)
        )

    @property
    def healthy(self) -> bool:
        """``ready``, and the broker confirmed the probe's publish."""
        return self.ready and self.confirms_flowing

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict: what ``/readyz`` answers with."""
        return {
            "service": self.service,
            "ready": self.ready,
            "healthy": self.healthy,
            "state": self.state,
            "connected": self.connected,
            "confirms_flowing": self.confirms_flowing,
            "round_trip_s": None if self.round_trip_s is None else round(self.round_trip_s, 6),
            "last_round_trip": (
                None if self.last_round_trip is None else self.last_round_trip.isoformat()
            ),
            "consumers": [
                {
                    "kind": c.kind,
                    "group": c.group,
                    "message_type": c.message_type,
                    "queues": list(c.queues),
                    "consuming": c.consuming,
                }
                for c in self.consumers
            ],
            "problems": list(self.problems),
        }


@dataclass(frozen=True, slots=True)
class _Probe:
    at: float  # monotonic time it finished
    round_trip_s: float | None
    error: str | None


class HealthMonitor:
    """Builds a bus's ``HealthReport``s and remembers the last broker round-trip."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._last: _Probe | None = None
        self._last_answer: datetime | None = None
        self._running: asyncio.Task[_Probe] | None = None

    def forget(self) -> None:
        """A new connection: earlier probes say nothing about it."""
        self._last = None

    async def report(
        self,
        state: BusState,
        transport: Transport | None,
        consumers: list[tuple[Literal["event", "command"], str, str, tuple[str, ...]]],
        *,
        timeout: float,
    ) -> HealthReport:
        connected = transport is not None and transport.connected
        checked = tuple(
            ConsumerHealth(
                kind=kind,
                group=group,
                message_type=message_type,
                queues=queues,
                consuming=(
                    connected
                    and state in ("running", "draining")
                    and transport is not None
                    and all(transport.consuming(q) for q in queues)
                ),
            )
            for kind, group, message_type, queues in consumers
        )
        problems: list[str] = []
        if state != "running":
            problems.append(f"the bus is {state}")
        if transport is not None and not connected:
            problems.append(f"not connected to {transport.display_url} (reconnecting)")
        elif state == "running":
            problems += [
                f"{c.kind} consumer of {c.message_type} in group {c.group!r} is not consuming"
                for c in checked
                if not c.consuming
            ]
        probe: _Probe | None = None
        if connected and transport is not None:
            probe = await self._probe(transport, timeout)
            if probe.error is not None:
                problems.append(probe.error)
        return HealthReport(
            service=self._service,
            state=state,
            connected=connected,
            consumers=checked,
            round_trip_s=None if probe is None else probe.round_trip_s,
            last_round_trip=self._last_answer,
            confirms_flowing=probe is not None and probe.error is None,
            problems=tuple(problems),
        )

    async def _probe(self, transport: Transport, timeout: float) -> _Probe:
        last = self._last
        if last is not None and time.monotonic() - last.at < PROBE_INTERVAL_S:
            return last
        if self._running is None or self._running.done():
            # Shielded and shared: a probe request that gives up (its HTTP client left)
            # does not cancel the round-trip others are waiting for.
            self._running = asyncio.ensure_future(self._round_trip(transport, timeout))
        return await asyncio.shield(self._running)

    async def _round_trip(self, transport: Transport, timeout: float) -> _Probe:
        message = OutgoingMessage(
            body=b"", message_type="banyan.health-probe", persistent=False, expiration=0
        )
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await transport.publish(DEFAULT_EXCHANGE, PROBE_ROUTING_KEY, message, confirm=True)
        except TimeoutError:
            error = f"the broker did not confirm a probe publish within {timeout:g} s"
        except BanyanError as exc:
            error = f"probe publish failed: {exc}"
        else:
            now = time.monotonic()
            self._last_answer = datetime.now(UTC)
            self._last = _Probe(now, now - started, None)
            return self._last
        self._last = _Probe(time.monotonic(), None, error)
        return self._last
