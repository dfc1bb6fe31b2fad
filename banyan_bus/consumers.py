"""The way in: what one service consumes, its topology, and the engines that consume it.

A service's subscriptions (one per group and event type, several handlers each)
and the commands and queries it owns are recorded here before the bus starts;
at start they are declared on the broker and one engine starts per queue (an
ordered group's types share one stream engine). ``MessageBus`` keeps the public
calls (``subscribe``, ``include``, ``topology``) and the lifecycle; this module
keeps what they do, so each concept has one room: ``publishing.py`` is the way
out, this is the way in.

Stopping is in two steps because the bus orders them with its grace period:
``stop_consuming`` (no new deliveries; prefetched ones go back at once), then
``drain`` (wait, then cancel what is still running, bounded).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import aclosing
from typing import Literal

import structlog

from banyan_bus.consume import SubscriptionConsumer
from banyan_bus.context import MessageContext
from banyan_bus.contracts import ContractRegistry, Message
from banyan_bus.declarations import Declaration, QueueType, apply, declared_in_order
from banyan_bus.delivery import make_context
from banyan_bus.envelope import Envelope
from banyan_bus.errors import HandlerError
from banyan_bus.handlers import HandlerSpec
from banyan_bus.idempotency import IdempotencyStore
from banyan_bus.middleware import Middleware, wrap_handler
from banyan_bus.ordered import OrderedStreamConsumer
from banyan_bus.retry import RetryPolicy
from banyan_bus.rpc import CommandConsumer, command_plan
from banyan_bus.subscription import Subscription, SubscriptionOptions, event_type_of, ordered_stream
from banyan_bus.telemetry import Telemetry
from banyan_bus.topology import (
    check_group_name,
    command_queue,
    delay_plan,
    group_plan,
    ordered_plan,
    retry_route_plan,
    root_plan,
)
from banyan_bus.transport.base import Delivery, Transport

log = structlog.get_logger("banyan_bus.bus")

Engine = SubscriptionConsumer | OrderedStreamConsumer | CommandConsumer
ConsumerInfo = tuple[Literal["event", "command"], str, str, tuple[str, ...]]


class Consumers:
    """The subscriptions and owned requests of one service, and their running engines."""

    def __init__(
        self,
        service: str,
        *,
        contracts: ContractRegistry,
        queue_type: QueueType,
        retry: RetryPolicy,
        handler_timeout: float | None,
        idempotency_store: IdempotencyStore,
        idempotency_ttl: float,
        max_message_size: int,
        middleware: Sequence[Middleware],
    ) -> None:
        self._service = service
        self._contracts = contracts
        self._queue_type = queue_type
        self._retry = retry
        self._handler_timeout = handler_timeout
        self._idempotency_store = idempotency_store
        self._idempotency_ttl = idempotency_ttl
        self._max_message_size = max_message_size
        self._middleware = tuple(middleware)
        self.subscriptions: dict[tuple[str, str], Subscription] = {}
        #: Each group's ordered subscriptions (its ordered stream), in subscription order.
        self._streams: dict[str, list[Subscription]] = {}
        #: Command and query types this service owns: their handler and options.
        self.commands: dict[str, tuple[HandlerSpec, SubscriptionOptions]] = {}
        self._engines: list[SubscriptionConsumer | OrderedStreamConsumer] = []
        self._stream_engines: dict[str, OrderedStreamConsumer] = {}
        self._command_engines: list[CommandConsumer] = []
        self._transport: Transport | None = None
        self._telemetry: Telemetry | None = None
        self._delays_declared = False
        self._delay_lock = asyncio.Lock()

    # -- what is consumed -----------------------------------------------------------

    def record(
        self,
        contract: type[Message],
        spec: HandlerSpec,
        options: SubscriptionOptions,
        *,
        started: bool,
    ) -> Subscription:
        """Add ``spec`` to its group's subscription, creating it on first use."""
        spec = wrap_handler(spec, (*self._middleware, *options.middleware))
        message_type = event_type_of(contract)
        group = check_group_name(options.subscription_group or self._service)
        sub = self.subscriptions.get((group, message_type))
        if sub is None:
            sub = Subscription.create(
                message_type,
                spec,
                options,
                group=group,
                queue_type=self._queue_type,
                retry=self._retry,
                timeout=self._handler_timeout,
                idempotency_store=self._idempotency_store,
                idempotency_ttl=self._idempotency_ttl,
            )
            if sub.ordered:  # the group's ordered subscriptions share one stream: must agree
                stream = self._streams.setdefault(group, [])
                ordered_stream([*stream[:1], sub], group)  # all agree with the first
                stream.append(sub)
            self.subscriptions[(group, message_type)] = sub
            return sub
        if any(h.name == spec.name for h in sub.handlers):
            raise HandlerError(f"{spec.name} already handles {message_type} in group {group!r}")
        if started:
            raise HandlerError(
                f"group {group!r} is already consuming {message_type}; add its handlers "
                f"before bus.start() so they run in definition order from the first message."
            )
        sub.join(spec, options, queue_type=self._queue_type)
        return sub

    def own(self, kind: str, spec: HandlerSpec, options: SubscriptionOptions) -> None:
        """Make this service the owner of ``spec``'s command or query type."""
        message_type = spec.contract.__message_type__
        if message_type in self.commands:
            raise HandlerError(
                f"{message_type} already has a handler in this service "
                f"({self.commands[message_type][0].name}); exactly one handler owns a {kind}"
            )
        self.commands[message_type] = (
            wrap_handler(spec, (*self._middleware, *options.middleware)),
            options,
        )

    def infos(self) -> list[ConsumerInfo]:
        """What ``bus.health()`` checks: each consumer's kind, group, type and queues."""
        infos: list[ConsumerInfo] = [
            ("event", sub.group, sub.message_type, tuple(sub.queue_names))
            for sub in self.subscriptions.values()
        ]
        infos += [
            ("command", self._service, message_type, (command_queue(message_type),))
            for message_type in self.commands
        ]
        return infos

    # -- topology -------------------------------------------------------------------

    @staticmethod
    def _uses_delays(sub: Subscription) -> bool:
        # Ordered subscriptions retry in place; others retry (and idempotent ones
        # come back when their key is busy) through the delay levels.
        return not sub.ordered and (bool(sub.retry.delayed) or sub.dedup is not None)

    def _stream(self, group: str) -> list[Subscription]:
        return list(self._streams.get(group, ()))

    def _plan(self, sub: Subscription) -> list[Declaration]:
        if sub.ordered:  # the group's whole ordered stream, this type's part included
            types = [s.message_type for s in self._streams[sub.group]]
            return ordered_plan(sub.group, types, sub.queue, partitions=sub.partitions)
        plan = group_plan(sub.group, sub.message_type, sub.queue)
        if self._uses_delays(sub):
            plan += retry_route_plan(sub.queue_name)
        return plan

    def _units(self) -> list[Subscription]:
        """The subscriptions that declare and start something: every one but the ordered
        ones after the first of their group's stream (the stream is one plan, one engine)."""
        return [
            sub
            for sub in self.subscriptions.values()
            if not sub.ordered or self._streams[sub.group][0] is sub
        ]

    def _shared_plan(self) -> tuple[list[Declaration], bool]:
        """What the subscriptions share (the root, and the delay levels if any uses them)."""
        plan = root_plan()
        delays = any(self._uses_delays(sub) for sub in self.subscriptions.values())
        if delays:
            plan += delay_plan()
        return plan, delays

    def _event_plan(self) -> tuple[list[Declaration], bool]:
        """What the subscriptions declare (one plan per ordered stream, not one per
        type), and whether that includes the delay levels."""
        plan, delays = self._shared_plan()
        for sub in self._units():
            plan += self._plan(sub)
        return plan, delays

    def topology(self) -> list[Declaration]:
        """Everything this service declares on the broker, in declaration order."""
        plan = self._event_plan()[0]
        for message_type in self.commands:
            plan += command_plan(message_type)
        return plan

    # -- running --------------------------------------------------------------------

    def _on(self) -> tuple[Transport, Telemetry]:
        if self._transport is None or self._telemetry is None:
            raise RuntimeError("the bus is not started: use `async with bus:` first")
        return self._transport, self._telemetry

    async def start(self, transport: Transport, telemetry: Telemetry) -> None:
        """Declare everything recorded so far on ``transport`` and start its engines."""
        self._transport, self._telemetry = transport, telemetry
        # One batch: the transport may take many declarations at once (RabbitMQ: over a
        # few channels). Each subscription's consumer starts, one at a time, as soon as
        # its own declarations answered, while the next ones are being declared.
        shared, self._delays_declared = self._shared_plan()
        units = self._units()
        plans = [self._plan(sub) for sub in units]
        count = len(shared) + sum(len(plan) for plan in plans)
        async with transport.declaring(count, consumers=len(units)) as width:
            await apply(transport, shared)
            async with aclosing(declared_in_order(transport, plans, width)) as declared:
                async for index in declared:
                    await self._start_engine(units[index])
        for message_type, (spec, options) in self.commands.items():
            await self._start_command_engine(message_type, spec, options)

    async def add(self, sub: Subscription) -> None:
        """Declare and consume a subscription made while the bus runs."""
        await self._declare(sub)
        await self._start_engine(sub)

    async def ensure_delays(self) -> None:
        """Declare the delay levels once per connection (idempotent on the broker)."""
        if self._delays_declared:
            return
        async with self._delay_lock:
            if not self._delays_declared:
                await apply(self._on()[0], delay_plan())
                self._delays_declared = True

    async def _declare(self, sub: Subscription) -> None:
        if self._uses_delays(sub):
            await self.ensure_delays()
        await apply(self._on()[0], self._plan(sub))

    async def _start_engine(self, sub: Subscription) -> None:
        if sub.ordered:
            await self._start_stream(sub.group)
            return
        engine = self._engine(sub)
        await engine.start()
        self._engines.append(engine)

    async def _start_stream(self, group: str) -> None:
        """One engine per ordered stream; a type subscribed later joins the running one."""
        if group in self._stream_engines:
            return
        stream = OrderedStreamConsumer(
            group,
            transport=self._on()[0],
            subscriptions=lambda: self._stream(group),
            engine=self._engine,
        )
        await stream.start()
        self._engines.append(stream)
        self._stream_engines[group] = stream

    def _engine(self, sub: Subscription) -> SubscriptionConsumer:
        transport, telemetry = self._on()
        return SubscriptionConsumer(
            sub,
            transport=transport,
            registry=self._contracts,
            ensure_delays=self.ensure_delays,
            telemetry=telemetry,
            service=self._service,
            max_message_size=self._max_message_size,
        )

    async def _start_command_engine(
        self, message_type: str, spec: HandlerSpec, options: SubscriptionOptions
    ) -> None:
        transport, telemetry = self._on()
        group = self._service

        def context(envelope: Envelope, delivery: Delivery) -> MessageContext:
            return make_context(envelope, delivery, group=group)

        engine = CommandConsumer(
            transport=transport,
            registry=self._contracts,
            message_type=message_type,
            handler=spec,
            service=self._service,
            concurrency=options.concurrency,
            timeout=options.handler_timeout(self._handler_timeout),
            context_factory=context,
            telemetry=telemetry,
        )
        await engine.start()
        self._command_engines.append(engine)

    # -- stopping -------------------------------------------------------------------

    async def stop_consuming(self) -> list[Engine]:
        """No new deliveries; unstarted ones go back to the queue. Returns the engines."""
        engines: list[Engine] = [*self._engines, *self._command_engines]
        for engine in engines:
            await engine.stop_consuming()
        return engines

    async def drain(self, engines: list[Engine], grace: float) -> bool:
        """Let running handlers finish within ``grace`` s, then cancel the rest (bounded).

        True if a handler had to be abandoned (it ignored its cancellation): its
        message is back in the queue, but its task may still be running.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        busy = []
        for engine in engines:
            if not await engine.wait_idle(max(0.0, deadline - loop.time())):
                busy.append(engine)
        if busy:
            log.warning(
                "grace_period_over",
                service=self._service,
                in_flight=sum(engine.in_flight for engine in busy),
                detail="returning unfinished messages to their queue",
            )
            # Bounded (delivery.CANCEL_WAIT_S), all at once: a handler that ignores
            # cancellation is abandoned, its message returned, and stop() goes on.
            await asyncio.gather(*(engine.cancel_in_flight() for engine in busy))
        self._engines.clear()
        self._stream_engines.clear()
        self._command_engines.clear()
        self._transport = self._telemetry = None
        self._delays_declared = False
        return bool(busy) and any(engine.in_flight for engine in busy)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no handler is running (for tests and shutdown)."""
        results = await asyncio.gather(*(e.wait_idle(timeout) for e in self._engines))
        return all(results)
