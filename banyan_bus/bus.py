"""``MessageBus``: the one object a service holds.

Example::

    bus = MessageBus(service="email-service")       # URL from BANYAN_URL, else memory://
    await bus.subscribe(UserCreated, send_welcome)
    async with bus:
        await bus.publish(UserCreated(user_id="usr_1", ...))
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any, Self, TypeVar

import structlog
from dishka import Provider

from banyan_bus.consumers import Consumers
from banyan_bus.contracts import (
    ContractRegistry,
    Event,
    Message,
    registry,
)
from banyan_bus.delivery import CANCEL_WAIT_S
from banyan_bus.di import Injector
from banyan_bus.dlq import DeadLetterQueue
from banyan_bus.envelope import (
    DEFAULT_MAX_MESSAGE_SIZE,
)
from banyan_bus.errors import ConfigurationError, HandlerError
from banyan_bus.handlers import function_handler, handler_classes
from banyan_bus.health import BusState, HealthMonitor, HealthReport
from banyan_bus.idempotency import DEFAULT_TTL, IdempotencyStore, MemoryIdempotencyStore
from banyan_bus.middleware import Middleware
from banyan_bus.middleware import check as check_middleware
from banyan_bus.publishing import PublishApi, Publisher
from banyan_bus.retry import RetryPolicy
from banyan_bus.rpc import Requester
from banyan_bus.stage import STAGE_ENV, check_stage, scoped_url
from banyan_bus.subscription import (
    BUS_DEFAULT,
    DEFAULT_CONCURRENCY,
    DEFAULT_HANDLER_TIMEOUT,
    Subscription,
    SubscriptionOptions,
)
from banyan_bus.telemetry import (
    Telemetry,
)
from banyan_bus.topology import (
    Declaration,
    QueueOptions,
    QueueType,
    check_group_name,
)
from banyan_bus.transport.base import Transport
from banyan_bus.transport.factory import make_transport
from banyan_bus.transport.url import mask_url
from banyan_bus.versions import pinned_versions

log = structlog.get_logger("banyan_bus.bus")

M = TypeVar("M", bound=Message)

DEFAULT_URL = "memory://"


def _published(contracts: Sequence[type[Event]]) -> tuple[type[Event], ...]:
    for contract in contracts:
        if not (isinstance(contract, type) and issubclass(contract, Event)):
            raise ConfigurationError(f"publishes= takes event contracts, got {contract!r}")
    return tuple(contracts)


class MessageBus(PublishApi):
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
    event is sent as that version (see ``@downcaster``). ``ssl_context`` is TLS to
    the broker built in code (else the ``amqps://`` URL's ``cafile``/``certfile``/...).
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
        ssl_context: ssl.SSLContext | None = None,
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
        #: TLS to the broker built in code; replaces the ``amqps://`` URL's TLS options.
        self.ssl_context = ssl_context
        self.idempotency_store: IdempotencyStore = idempotency_store or MemoryIdempotencyStore()
        self.idempotency_ttl = idempotency_ttl
        self.contracts = contracts or registry
        self.pinned_contracts = pinned_versions(publish_versions or {}, self.contracts)
        self._transport: Transport | None = None
        self._injector = Injector(providers, {MessageBus: self})
        self._telemetry = Telemetry(self.service, "memory")
        self._publisher: Publisher | None = None
        self._started = False
        self._state: BusState = "stopped"
        self._health = HealthMonitor(self.service)
        #: Runs around every publish and every handler, the first outermost (middleware.py).
        self.middleware = check_middleware(middleware)
        self._in = Consumers(
            self.service,
            contracts=self.contracts,
            queue_type=self.queue_type,
            retry=self.retry,
            handler_timeout=self.handler_timeout,
            idempotency_store=self.idempotency_store,
            idempotency_ttl=self.idempotency_ttl,
            max_message_size=self.max_message_size,
            middleware=self.middleware,
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
            self.url,
            name=self.service,
            publish_timeout=self.publish_timeout,
            ssl_context=self.ssl_context,
        )
        self._telemetry = Telemetry(
            self.service, "memory" if self.url.startswith("memory") else "rabbitmq"
        )
        await transport.connect()
        self._transport = transport
        self._publisher = Publisher(
            service=self.service,
            transport=transport,
            telemetry=self._telemetry,
            requester=Requester(transport),
            max_message_size=self.max_message_size,
            middleware=self.middleware,
            ensure_delays=self._in.ensure_delays,
        )
        try:
            await self._in.start(transport, self._telemetry)
        except BaseException:
            self._state = "stopped"
            await self._close_transport()
            raise
        self._started = True
        self._state = "running"
        self._health.forget()
        self._log.info(
            "bus_started", url=transport.display_url, subscriptions=len(self._in.subscriptions)
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
        engines = await self._in.stop_consuming()
        abandoned = await self._in.drain(engines, grace)
        self._publisher = None
        if abandoned:
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
        return await self._health.report(
            self._state, self._transport, self._in.infos(), timeout=timeout
        )

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no handler of this bus is running (for tests and shutdown)."""
        return await self._in.wait_idle(timeout)

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
        known = len(self._in.subscriptions)
        sub = self._in.record(
            contract, function_handler(contract, handler), options, started=self._started
        )
        if self._started and len(self._in.subscriptions) > known:  # a new one: declare it
            await self._in.add(sub)
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
            self._in.record(contract, function_handler(contract, fn), checked, started=False)
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
        return tuple(self._in.subscriptions.values())

    @property
    def owned_requests(self) -> tuple[str, ...]:
        """The command and query types this service owns."""
        return tuple(self._in.commands)

    @property
    def owned_contracts(self) -> tuple[type[Message], ...]:
        """The contracts of the command and query types this service owns."""
        return tuple(spec.contract for spec, _options in self._in.commands.values())

    def dlq(self, group: str, contract: type[Message] | str) -> DeadLetterQueue:
        """The dead-letter queue of ``group``'s subscription to ``contract``.

        ``list()``/``find()`` to inspect, ``replay()`` to send back to that group
        alone (same message id, attempts reset), ``purge()``. Needs a started bus.
        """
        return DeadLetterQueue(self.transport, group, contract)

    def topology(self) -> list[Declaration]:
        """Everything this service declares on the broker, in declaration order.

        What ``banyan topology`` prints and ``--declare`` applies ahead of a deploy.
        """
        return self._in.topology()

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
        for cls in handler_classes(handlers):
            if self._started:
                raise HandlerError(
                    f"register {cls.__qualname__} before bus.start(): class handlers are wired "
                    f"into the dependency container when the bus starts"
                )
            opts, spec = self._injector.handler(cls)
            if opts.kind == "event":
                self._in.record(opts.contract, spec, opts.options, started=False)
            else:
                self._in.own(opts.kind, spec, opts.options)
