"""``MessageBus``: the one object a service holds.

Example::

    bus = MessageBus(service="email-service")       # URL from BANYAN_URL, else memory://
    await bus.subscribe(UserCreated, send_welcome)
    async with bus:
        await bus.publish(UserCreated(user_id="usr_1", ...))
"""

from __future__ import annotations

import asyncio
import difflib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import structlog
from dishka import Provider
from opentelemetry.trace import SpanKind

from banyan_bus.consume import OrderedStreamConsumer, SubscriptionConsumer
from banyan_bus.context import MessageContext, current_context
from banyan_bus.contracts import (
    Command,
    ContractRegistry,
    Event,
    Message,
    Query,
    registry,
    routing_key_for,
)
from banyan_bus.delay import delay_route, parse_after
from banyan_bus.delivery import CANCEL_WAIT_S, make_context
from banyan_bus.di import Injector
from banyan_bus.dlq import DeadLetterQueue
from banyan_bus.envelope import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_DELAY,
    HEADER_PARTITION_KEY,
    Envelope,
    Priority,
    encode,
)
from banyan_bus.errors import ConfigurationError, ContractError, HandlerError
from banyan_bus.handlers import HandlerSpec, dispatch_table, function_handler, handler_options
from banyan_bus.health import BusState, HealthMonitor, HealthReport
from banyan_bus.idempotency import DEFAULT_TTL, IdempotencyStore, MemoryIdempotencyStore
from banyan_bus.middleware import MessageCall, Middleware, Next, compose, wrap_handler
from banyan_bus.middleware import check as check_middleware
from banyan_bus.retry import RetryPolicy
from banyan_bus.rpc import CommandConsumer, Requester, command_plan
from banyan_bus.stage import STAGE_ENV, check_stage, scoped_url
from banyan_bus.subscription import (
    BUS_DEFAULT,
    DEFAULT_CONCURRENCY,
    DEFAULT_HANDLER_TIMEOUT,
    Subscription,
    SubscriptionOptions,
    event_type_of,
    ordered_stream,
)
from banyan_bus.telemetry import (
    BODY_SIZE,
    CONVERSATION_ID,
    MESSAGE_ID,
    MESSAGE_TYPE,
    Telemetry,
    fail,
)
from banyan_bus.topology import (
    COMMANDS_EXCHANGE,
    ROOT_EXCHANGE,
    Declaration,
    QueueOptions,
    QueueType,
    apply,
    check_group_name,
    command_queue,
    delay_plan,
    delayed_publish_destination,
    group_plan,
    ordered_plan,
    retry_route_plan,
    root_plan,
)
from banyan_bus.transport.base import Delivery, Headers, Transport
from banyan_bus.transport.factory import make_transport
from banyan_bus.transport.url import mask_url
from banyan_bus.versions import pinned_versions, read_as

log = structlog.get_logger("banyan_bus.bus")

M = TypeVar("M", bound=Message)

DEFAULT_URL = "memory://"


def _published(contracts: Sequence[type[Event]]) -> tuple[type[Event], ...]:
    for contract in contracts:
        if not (isinstance(contract, type) and issubclass(contract, Event)):
            raise ConfigurationError(f"publishes= takes event contracts, got {contract!r}")
    return tuple(contracts)


class MessageBus:
    """A service's connection to the event bus: publish, subscribe, start, stop.

    ``service`` names the publisher in every envelope and is the default
    subscription group. ``url`` defaults to the ``BANYAN_URL`` environment
    variable, else ``memory://`` (the in-process broker).

    Options: ``queue_type`` ("quorum" or "classic") for new subscriptions;
    ``retry`` the default ``RetryPolicy``; ``handler_timeout`` seconds (default
    120); ``max_message_size`` bytes of an encoded envelope (default 256 KiB);
    ``grace_period`` seconds that ``stop()`` lets in-flight handlers finish;
    ``publish_timeout`` seconds a publish waits for the broker's confirm (through a
    reconnect, a memory alarm) before it raises ``PublishError``.
    ``middleware`` runs around every publish and every handler (``banyan_bus.middleware``).
    ``stage`` (else ``BANYAN_STAGE``) puts the bus in that stage's vhost (``stage.py``);
    ``publishes`` names the event contracts the service publishes (its AsyncAPI document).
    ``publish_versions`` pins the version ``publish`` emits per contract
    (``{UserCreated: 1}``, or by type name) while subscribers catch up: a newer
    event is sent as that version (see ``@downcaster``).
    """

    def __init__(
        self,
        service: str,
        url: str | None = None,
        *,
        queue_type: QueueType = "quorum",
        retry: RetryPolicy | None = None,
        handler_timeout: float | None = DEFAULT_HANDLER_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        grace_period: float = 30.0,
        publish_timeout: float = 30.0,
        providers: Sequence[Provider] = (),
        idempotency_store: IdempotencyStore | None = None,
        idempotency_ttl: float = DEFAULT_TTL,
        contracts: ContractRegistry | None = None,
        middleware: Sequence[Middleware] = (),
        stage: str | None = None,
        publishes: Sequence[type[Event]] | None = None,
        publish_versions: Mapping[type[Message] | str, int] | None = None,
    ) -> None:
        self.service = check_group_name(service, what="service")
        #: ``stage`` (else ``BANYAN_STAGE``) scopes the bus to that stage's vhost (stage.py).
        self.stage = check_stage(stage or os.environ.get(STAGE_ENV) or None)
        self.url = scoped_url(url or os.environ.get("BANYAN_URL") or DEFAULT_URL, self.stage)
        #: The events this service publishes, as it declares them (AsyncAPI); None: not said.
        self.publishes = None if publishes is None else _published(publishes)
        QueueOptions(queue_type=queue_type)  # validates
        self.queue_type: QueueType = queue_type
        self.retry = retry if retry is not None else RetryPolicy.default()
        if handler_timeout is not None and handler_timeout <= 0:
            raise ConfigurationError(f"handler_timeout must be > 0 seconds, got {handler_timeout}")
        self.handler_timeout = handler_timeout
        if max_message_size < 1024:
            raise ConfigurationError(
                f"max_message_size must be at least 1024 bytes, got {max_message_size}"
            )
        self.max_message_size = max_message_size
        self.grace_period = grace_period
        if publish_timeout <= 0:
            raise ConfigurationError(f"publish_timeout must be > 0 seconds, got {publish_timeout}")
        self.publish_timeout = publish_timeout
        self.idempotency_store: IdempotencyStore = idempotency_store or MemoryIdempotencyStore()
        self.idempotency_ttl = idempotency_ttl
        self.contracts = contracts or registry
        self.pinned_contracts = pinned_versions(publish_versions or {}, self.contracts)
        self._transport: Transport | None = None
        self._subscriptions: dict[tuple[str, str], Subscription] = {}
        self._consumers: list[SubscriptionConsumer | OrderedStreamConsumer] = []
        self._delays_declared = False
        self._delay_lock = asyncio.Lock()
        self._injector = Injector(providers, {MessageBus: self})
        self._telemetry = Telemetry(self.service, "memory")
        self._commands: dict[str, tuple[HandlerSpec, SubscriptionOptions]] = {}
        self._command_consumers: list[CommandConsumer] = []
        self._requester: Requester | None = None
        self._started = False
        self._state: BusState = "stopped"
        self._health = HealthMonitor(self.service)
        #: Runs around every publish and every handler, the first outermost (middleware.py).
        self.middleware = check_middleware(middleware)
        self._publish_chain: Next | None = (
            compose(self.middleware, self._send) if self.middleware else None
        )
        self._log = log.bind(service=service)

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return f"<MessageBus service={self.service!r} url={self.display_url!r} {state}>"

    @property
    def display_url(self) -> str:
        """``url`` with its password masked: print and log this one, never ``url``."""
        return self._transport.display_url if self._transport else mask_url(self.url)

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def state(self) -> BusState:
        """``stopped``, ``starting``, ``running`` or ``draining`` (``stop()`` under way)."""
        return self._state

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise RuntimeError(
                f"{self!r} is not started: use `async with bus:` or `await bus.start()`"
            )
        return self._transport

    async def start(self) -> None:
        """Connect, declare the topology of every subscription, start consuming."""
        if self._started:
            return
        self._state = "starting"
        if self._injector.needed:
            self._injector.build()  # fails here, before connecting, on a missing dependency
        transport = make_transport(
            self.url, name=self.service, publish_timeout=self.publish_timeout
        )
        self._telemetry = Telemetry(
            self.service, "memory" if self.url.startswith("memory") else "rabbitmq"
        )
        await transport.connect()
        self._transport = transport
        self._requester = Requester(transport)
        try:
            await apply(transport, root_plan())
            for sub in self._subscriptions.values():
                await self._declare(sub)
            for sub in self._subscriptions.values():
                await self._start_consumer(sub)
            for message_type, (spec, options) in self._commands.items():
                await self._start_command_consumer(message_type, spec, options)
        except BaseException:
            self._state = "stopped"
            await self._close_transport()
            raise
        self._started = True
        self._state = "running"
        self._health.forget()
        self._log.info(
            "bus_started", url=transport.display_url, subscriptions=len(self._subscriptions)
        )

    async def stop(self, grace_period: float | None = None) -> None:
        """Stop consuming, let in-flight handlers finish, return the rest, disconnect.

        Deliveries whose handler has not started go back to the queue at once;
        running handlers get ``grace_period`` s, then are cancelled, and one that
        ignores the cancellation is abandoned after ``delivery.CANCEL_WAIT_S``
        (logged, its message returned): this returns within the grace period
        plus about a second, whatever handlers do.
        """
        if self._transport is None:
            return
        self._state = "draining"
        grace = self.grace_period if grace_period is None else grace_period
        consumers: list[SubscriptionConsumer | OrderedStreamConsumer | CommandConsumer] = [
            *self._consumers,
            *self._command_consumers,
        ]
        for consumer in consumers:
            await consumer.stop_consuming()
        deadline = asyncio.get_running_loop().time() + grace
        busy = []
        for consumer in consumers:
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            if not await consumer.wait_idle(left):
                busy.append(consumer)
        if busy:
            self._log.warning(
                "grace_period_over",
                in_flight=sum(consumer.in_flight for consumer in busy),
                detail="returning unfinished messages to their queue",
            )
            # Bounded (delivery.CANCEL_WAIT_S), all at once: a handler that ignores
            # cancellation is abandoned, its message returned, and stop() goes on.
            await asyncio.gather(*(consumer.cancel_in_flight() for consumer in busy))
        self._consumers.clear()
        self._command_consumers.clear()
        self._requester = None
        if busy and any(consumer.in_flight for consumer in busy):
            # Abandoned handlers are still running in tasks the AMQP client waits for
            # when it closes its channels, after the connection itself is closed (so the
            # broker has taken their messages back): do not wait for them.
            try:
                async with asyncio.timeout(CANCEL_WAIT_S):
                    await self._close_transport()
            except TimeoutError:
                self._log.warning("close_abandoned_handlers", detail="the connection is closed")
        else:
            await self._close_transport()
        await self._injector.close()
        await self.idempotency_store.close()
        self._started = False
        self._state = "stopped"
        self._log.info("bus_stopped")

    async def _close_transport(self) -> None:
        transport, self._transport = self._transport, None
        self._delays_declared = False
        if transport is not None:
            await transport.close()

    async def health(self, *, timeout: float = 2.0) -> HealthReport:
        """Connection, consumers and a broker round-trip, as a :class:`HealthReport`.

        ``report.ready`` is what a readiness probe wants: running, connected, and
        every subscription consuming (False while reconnecting, and from the moment
        ``stop()`` begins to drain). The round-trip is a confirmed publish that no
        queue receives, bounded by ``timeout``; ``report.healthy`` also needs it.
        See ``banyan_bus.health``.

        Example::

            report = await bus.health()
            assert report.ready, report.problems
        """
        consumers: list[tuple[Literal["event", "command"], str, str, tuple[str, ...]]] = [
            ("event", sub.group, sub.message_type, tuple(sub.queue_names))
            for sub in self._subscriptions.values()
        ]
        consumers += [
            ("command", self.service, message_type, (command_queue(message_type),))
            for message_type in self._commands
        ]
        return await self._health.report(
            self._state, self._transport, consumers, timeout=timeout
        )

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no handler of this bus is running (for tests and shutdown)."""
        results = await asyncio.gather(*(c.wait_idle(timeout) for c in self._consumers))
        return all(results)

    # -- subscribe ------------------------------------------------------------------

    async def subscribe(
        self,
        contract: type[M],
        handler: Callable[..., Awaitable[Any]],
        *,
        subscription_group: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        prefetch: int | None = None,
        auto_ack: bool = True,
        retry: RetryPolicy | None = None,
        timeout: float | None = BUS_DEFAULT,
        queue_type: QueueType | None = None,
        max_length: int | None = None,
        ordered: bool = False,
        partitions: int | None = None,
        idempotent: bool = False,
        idempotency_key: Callable[[Any], str] | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> Subscription:
        """Handle ``contract`` events with ``handler`` in ``subscription_group``.

        Every group gets its own copy of each event; the instances (and
        subscriptions) of one group share its queue. Several handlers of one
        group run in the order they were subscribed. ``concurrency`` bounds
        handlers running at once (default 10); ``prefetch`` bounds unacked
        deliveries (default 3 x concurrency). Callable before or after ``start``.

        ``ordered=True``: events with the same partition key (``publish(...,
        partition_key=)`` or the contract's ``partition_key=`` field) are handled
        one at a time in publish order, across all instances; a failing one is
        retried in place, holding its key. ``partitions`` (default 4) spreads keys
        over that many queues. ``idempotent=True`` (or ``idempotency_key=fn``)
        runs each handler once per event id (or key), through ``idempotency_store``.
        ``middleware`` runs around this handler, inside the bus's middleware.
        """
        options = SubscriptionOptions(
            subscription_group=subscription_group,
            concurrency=concurrency,
            prefetch=prefetch,
            auto_ack=auto_ack,
            retry=retry,
            timeout=timeout,
            queue_type=queue_type,
            max_length=max_length,
            ordered=ordered,
            partitions=partitions,
            idempotent=idempotent,
            idempotency_key=idempotency_key,
            middleware=middleware,
        )
        known = set(self._subscriptions)
        sub = self._record(contract, function_handler(contract, handler), options)
        if self._started and (sub.group, sub.message_type) not in known:
            await self._declare(sub)
            await self._start_consumer(sub)
        return sub

    def handler(
        self, contract: type[M], **options: Any
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Decorator form of ``subscribe``, for module level (before ``start``).

        Example::

            @bus.handler(UserCreated, subscription_group="welcome")
            async def send_welcome(event: UserCreated) -> None: ...
        """
        checked = SubscriptionOptions.from_options(options)

        def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            self._refuse_if_started(getattr(fn, "__qualname__", repr(fn)))
            self._record(contract, function_handler(contract, fn), checked)
            return fn

        return decorate

    def _refuse_if_started(self, what: str) -> None:
        if self._started:
            raise HandlerError(
                f"add {what} before bus.start(), or use `await bus.subscribe(...)` on a running bus"
            )

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """This service's subscriptions (group, message type, queue names, handlers)."""
        return tuple(self._subscriptions.values())

    @property
    def owned_requests(self) -> tuple[str, ...]:
        """The command and query types this service owns."""
        return tuple(self._commands)

    def dlq(self, group: str, contract: type[Message] | str) -> DeadLetterQueue:
        """The dead-letter queue of ``group``'s subscription to ``contract``.

        ``list()``/``find()`` to inspect, ``replay()`` to send back to that group
        alone (same message id, attempts reset), ``purge()``. Needs a started bus.
        """
        return DeadLetterQueue(self.transport, group, contract)

    def _record(
        self, contract: type[Message], spec: HandlerSpec, options: SubscriptionOptions
    ) -> Subscription:
        """Add ``spec`` to its group's subscription, creating it on first use."""
        spec = wrap_handler(spec, (*self.middleware, *options.middleware))
        message_type = event_type_of(contract)
        group = check_group_name(options.subscription_group or self.service)
        sub = self._subscriptions.get((group, message_type))
        if sub is None:
            sub = Subscription.create(
                message_type,
                spec,
                options,
                group=group,
                queue_type=self.queue_type,
                retry=self.retry,
                timeout=self.handler_timeout,
                idempotency_store=self.idempotency_store,
                idempotency_ttl=self.idempotency_ttl,
            )
            if sub.ordered:  # the group's ordered subscriptions share one stream: must agree
                ordered_stream([*self._subscriptions.values(), sub], group)
            self._subscriptions[(group, message_type)] = sub
            return sub
        if any(h.name == spec.name for h in sub.handlers):
            raise HandlerError(f"{spec.name} already handles {message_type} in group {group!r}")
        if self._started:
            raise HandlerError(
                f"group {group!r} is already consuming {message_type}; add its handlers "
                f"before bus.start() so they run in definition order from the first message."
            )
        sub.join(spec, options, queue_type=self.queue_type)
        return sub

    async def _declare(self, sub: Subscription) -> None:
        if self._uses_delays(sub):
            await self._ensure_delays()
        await apply(self.transport, self._subscription_plan(sub))

    @staticmethod
    def _uses_delays(sub: Subscription) -> bool:
        # Ordered subscriptions retry in place; others retry (and idempotent ones
        # come back when their key is busy) through the delay levels.
        return not sub.ordered and (bool(sub.retry.delayed) or sub.dedup is not None)

    def _subscription_plan(self, sub: Subscription) -> list[Declaration]:
        if sub.ordered:  # the group's whole ordered stream, this type's part included
            stream = ordered_stream(self._subscriptions.values(), sub.group)
            types = [s.message_type for s in stream]
            return ordered_plan(sub.group, types, sub.queue, partitions=sub.partitions)
        plan = group_plan(sub.group, sub.message_type, sub.queue)
        if self._uses_delays(sub):
            plan += retry_route_plan(sub.queue_name)
        return plan

    def topology(self) -> list[Declaration]:
        """Everything this service declares on the broker, in declaration order.

        What ``banyan topology`` prints and ``--declare`` applies ahead of a deploy.
        """
        plan = root_plan()
        subs = list(self._subscriptions.values())
        if any(self._uses_delays(sub) for sub in subs):
            plan += delay_plan()
        streams: set[str] = set()  # one plan per ordered stream, not one per type
        for sub in subs:
            if sub.ordered:
                if sub.group in streams:
                    continue
                streams.add(sub.group)
            plan += self._subscription_plan(sub)
        for message_type in self._commands:
            plan += command_plan(message_type)
        return plan

    async def _start_consumer(self, sub: Subscription) -> None:
        if sub.ordered:
            await self._start_stream(sub.group)
            return
        consumer = self._engine(sub)
        await consumer.start()
        self._consumers.append(consumer)

    async def _start_stream(self, group: str) -> None:
        """One consumer per ordered stream; a type subscribed later joins the running one."""
        if any(isinstance(c, OrderedStreamConsumer) and c.group == group for c in self._consumers):
            return
        stream = OrderedStreamConsumer(
            group,
            transport=self.transport,
            subscriptions=lambda: ordered_stream(self._subscriptions.values(), group),
            engine=self._engine,
        )
        await stream.start()
        self._consumers.append(stream)

    def _engine(self, sub: Subscription) -> SubscriptionConsumer:
        return SubscriptionConsumer(
            sub,
            transport=self.transport,
            registry=self.contracts,
            ensure_delays=self._ensure_delays,
            telemetry=self._telemetry,
            service=self.service,
            max_message_size=self.max_message_size,
        )

    async def _ensure_delays(self) -> None:
        """Declare the delay levels once per connection (idempotent on the broker)."""
        if self._delays_declared:
            return
        async with self._delay_lock:
            if not self._delays_declared:
                await apply(self.transport, delay_plan())
                self._delays_declared = True

    # -- class handlers ------------------------------------------------------------

    async def register(self, *handlers: type[Any] | ModuleType) -> None:
        """Deprecated: use ``include`` (the same, without ``await``).

        Kept as a thin alias because existing services and tests ``await`` it;
        ``include`` is the one the README teaches, since a plain call also works
        at module level, next to the handler classes.
        """
        self.include(*handlers)

    def include(self, *handlers: type[Any] | ModuleType) -> None:
        """Register ``@EventHandler`` / ``@CommandHandler`` / ``@QueryHandler`` classes.

        A module registers every decorated class defined in it, in definition
        order. Call before ``start()``: the dependency graph is checked then.
        """
        for item in handlers:
            if isinstance(item, ModuleType):
                found = [
                    obj
                    for obj in vars(item).values()
                    if isinstance(obj, type)
                    and handler_options(obj) is not None
                    and obj.__module__ == item.__name__
                ]
                for cls in found:
                    self._register_class(cls)
            else:
                self._register_class(item)

    def _register_class(self, cls: type[Any]) -> None:
        opts = handler_options(cls)
        if opts is None:
            raise HandlerError(
                f"{getattr(cls, '__qualname__', cls)!r} is not a handler class: decorate it with "
                f"@EventHandler(...), @CommandHandler(...) or @QueryHandler(...)"
            )
        if self._started:
            raise HandlerError(
                f"register {cls.__qualname__} before bus.start(): class handlers are wired "
                f"into the dependency container when the bus starts"
            )
        table = dispatch_table(cls, opts.contract)
        spec = HandlerSpec(
            name=f"{cls.__module__}.{cls.__qualname__}",
            contract=opts.contract,
            invoke=self._injector.invoker(cls, table),
            versions=frozenset(table),
        )
        self._injector.add(cls)
        if opts.kind == "event":
            self._record(opts.contract, spec, opts.options)
            return
        message_type = opts.contract.__message_type__
        if message_type in self._commands:
            raise HandlerError(
                f"{message_type} already has a handler in this service "
                f"({self._commands[message_type][0].name}); exactly one handler owns a "
                f"{opts.kind}"
            )
        self._commands[message_type] = (
            wrap_handler(spec, (*self.middleware, *opts.options.middleware)),
            opts.options,
        )

    async def _start_command_consumer(
        self, message_type: str, spec: HandlerSpec, options: SubscriptionOptions
    ) -> None:
        group = self.service

        def context(envelope: Envelope, delivery: Delivery) -> MessageContext:
            return make_context(envelope, delivery, group=group)

        consumer = CommandConsumer(
            transport=self.transport,
            registry=self.contracts,
            message_type=message_type,
            handler=spec,
            service=self.service,
            concurrency=options.concurrency,
            timeout=options.handler_timeout(self.handler_timeout),
            context_factory=context,
            telemetry=self._telemetry,
        )
        await consumer.start()
        self._command_consumers.append(consumer)

    # -- commands and queries --------------------------------------------------------

    async def send(
        self, command: Command, *, timeout: float = 30.0, result_type: Any = None
    ) -> Any:
        """Send a command to the one service that owns it; returns its result.

        The result is turned into the command's ``result=`` type (or
        ``result_type``). Raises ``RemoteHandlerError`` if the handler raised,
        ``RequestTimeout`` if no answer came within ``timeout`` seconds.
        """
        if not isinstance(command, Command):
            raise ContractError(f"send() takes a Command instance, got {command!r}")
        return await self._request(command, timeout, result_type)

    async def query(self, query: Query, *, timeout: float = 30.0, result_type: Any = None) -> Any:
        """Ask the service that owns ``query``; returns its answer (see ``send``)."""
        if not isinstance(query, Query):
            raise ContractError(f"query() takes a Query instance, got {query!r}")
        return await self._request(query, timeout, result_type)

    async def _request(self, message: Message, timeout: float, result_type: Any) -> Any:
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout}")
        requester = self._requester
        if requester is None:
            raise RuntimeError(f"{self!r} is not started: use `async with bus:` first")
        ctx = current_context()
        message_type = type(message).__message_type__
        headers: Headers = {}
        with self._telemetry.publish_span(
            message_type=message_type,
            exchange=COMMANDS_EXCHANGE,
            routing_key=routing_key_for(message_type),
            headers=headers,
            kind=SpanKind.CLIENT,
            operation="send",
        ) as span:
            outgoing = encode(
                message,
                service_name=self.service,
                correlation_id=ctx.correlation_id if ctx else None,
                causation_id=ctx.id if ctx else None,
                headers=headers,
                trace_context=Telemetry.trace_context(span, headers),
                max_size=self.max_message_size,
            )
            try:
                return await requester.request(
                    outgoing,
                    timeout=timeout,
                    result_type=result_type or type(message).__result_type__,
                )
            except Exception as exc:
                fail(span, exc)
                raise

    # -- publish --------------------------------------------------------------------

    @overload
    async def publish(
        self,
        message: Message,
        data: None = None,
        *,
        priority: Priority = "normal",
        wait_for_confirmation: bool = True,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        after: int | float | str | Any | None = None,
        partition_key: str | None = None,
        message_id: str | None = None,
        causation_id: str | None = None,
    ) -> str: ...

    @overload
    async def publish(
        self,
        message: type[Message] | str,
        data: dict[str, Any],
        *,
        priority: Priority = "normal",
        wait_for_confirmation: bool = True,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        after: int | float | str | Any | None = None,
        partition_key: str | None = None,
        message_id: str | None = None,
        causation_id: str | None = None,
    ) -> str: ...

    async def publish(
        self,
        message: Message | type[Message] | str,
        data: dict[str, Any] | None = None,
        *,
        priority: Priority = "normal",
        wait_for_confirmation: bool = True,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        after: int | float | str | Any | None = None,
        partition_key: str | None = None,
        message_id: str | None = None,
        causation_id: str | None = None,
    ) -> str:
        """Publish an event to every subscribed group; returns its message id.

        ``message`` is a contract instance, or a contract class with ``data``
        (a dict validated into it: pydantic's ``ValidationError`` if it does not
        fit, nothing sent), or a registered message type's name with ``data``
        (``publish("OrderPlaced", {...})``, as platform code writes it: the version
        ``publish_versions`` pins, else the oldest registered). With
        ``wait_for_confirmation`` (the default) this returns once the broker has
        stored the event on every bound queue.
        ``after`` delays delivery ("10 seconds", 1500 ms, an ISO time; at most a
        year). Publishing to a type nobody subscribes to is not an error.
        ``message_id`` reuses an id (a re-sent event keeps its identity, so
        idempotent handlers run once); by default a new one is made. Inside a
        handler, correlation and causation ids are taken from the message being
        handled unless given (an outbox relay gives the stored ones).
        """
        event = self._coerce(message, data)
        pinned = self.pinned_contracts.get(type(event).__message_type__)
        if pinned is not None and type(event) is not pinned:
            try:
                event = read_as(event, pinned)
            except ContractError as exc:
                raise ContractError(
                    f"publish_versions pins {pinned.__message_type__} to "
                    f"v{pinned.__message_version__}, and {exc}"
                ) from exc
        ctx = current_context()
        if ctx is not None:
            causation_id = causation_id or ctx.id
            if correlation_id is None:
                correlation_id = ctx.correlation_id
        delay_ms = parse_after(after) if after is not None else None
        extra: Headers = dict(headers) if headers else {}
        key = partition_key
        if key is None and type(event).__partition_key__ is not None:
            key = str(getattr(event, type(event).__partition_key__ or ""))
        if key is not None:
            extra[HEADER_PARTITION_KEY] = key
        if delay_ms is not None:
            extra[HEADER_DELAY] = delay_ms
        transport = self.transport
        message_type = type(event).__message_type__
        if delay_ms is None:
            exchange, routing_key = ROOT_EXCHANGE, routing_key_for(message_type)
        else:
            await self._ensure_delays()
            route = delay_route(delay_ms, delayed_publish_destination(message_type))
            exchange, routing_key = route.exchange, route.routing_key
        telemetry = self._telemetry
        with telemetry.publish_span(
            message_type=message_type, exchange=exchange, routing_key=routing_key, headers=extra
        ) as span:
            outgoing = encode(
                event,
                message_id=message_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                service_name=self.service,
                priority=priority,
                headers=extra,
                trace_context=Telemetry.trace_context(span, extra),
                max_size=self.max_message_size,
            )
            if span is not None:
                span.set_attribute(MESSAGE_ID, outgoing.message_id or "")
                span.set_attribute(CONVERSATION_ID, outgoing.correlation_id or "")
                span.set_attribute(BODY_SIZE, len(outgoing.body))
            try:
                if self._publish_chain is None:
                    await transport.publish(
                        exchange, routing_key, outgoing, confirm=wait_for_confirmation
                    )
                else:
                    call = MessageCall(
                        "publish",
                        message_type,
                        event,
                        outgoing.headers,
                        context=ctx,
                        outgoing=outgoing,
                        exchange=exchange,
                        routing_key=routing_key,
                        confirm=wait_for_confirmation,
                    )
                    await self._publish_chain(call)
            except Exception as exc:
                fail(span, exc)
                raise
        if telemetry.enabled:
            telemetry.published.add(1, {MESSAGE_TYPE: message_type})
        return outgoing.message_id or ""

    async def _send(self, call: MessageCall) -> None:
        """The publish middleware chain's last step: hand the message to the transport."""
        assert call.outgoing is not None  # a publish call always carries it
        await self.transport.publish(
            call.exchange, call.routing_key, call.outgoing, confirm=call.confirm
        )

    def _coerce(
        self, message: Message | type[Message] | str, data: dict[str, Any] | None
    ) -> Message:
        if isinstance(message, str):
            message = self._contract_named(message)
        if isinstance(message, type) and issubclass(message, Message):
            if data is None:
                raise ContractError(
                    f"publish({message.__name__}) needs the event's data: "
                    f"publish({message.__name__}, {{...}}) or publish({message.__name__}(...))"
                )
            event = message.model_validate(data)
        elif isinstance(message, Message):
            if data is not None:
                raise ContractError(
                    "publish(instance, data): give an instance or a class with data, not both"
                )
            event = message
        else:
            raise ContractError(
                f"publish() takes an Event instance or an Event class and a dict, got {message!r}"
            )
        if not isinstance(event, Event):
            raise ContractError(
                f"{type(event).__name__} is a {type(event).__message_kind__}; publish() is for "
                f"events. Use bus.send() for commands and bus.query() for queries."
            )
        if event.is_abstract_contract():
            raise ContractError(f"{type(event).__name__} is an abstract contract")
        return event

    def _contract_named(self, message_type: str) -> type[Message]:
        """The contract ``publish("OrderPlaced", {...})`` means: pinned, else the oldest.

        The oldest and not the latest: a name carries no version, and every
        subscriber that serves the type serves its oldest version, so that is the one
        a rolling deploy cannot break (pin a newer one with ``publish_versions``).
        """
        pinned = self.pinned_contracts.get(message_type)
        if pinned is not None:
            return pinned
        versions = self.contracts.versions(message_type)
        if not versions:
            known = sorted({c.__message_type__ for c in self.contracts if issubclass(c, Event)})
            close = difflib.get_close_matches(message_type, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ContractError(
                f"publish({message_type!r}, ...): no event contract of that message type is "
                f"registered in this process (import the module that defines it).{hint}"
            )
        return versions[min(versions)]
