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
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar, overload

import structlog

from banyan_bus.consume import Subscription, SubscriptionConsumer
from banyan_bus.context import current_context
from banyan_bus.contracts import ContractRegistry, Event, Message, registry, routing_key_for
from banyan_bus.delay import (
    DELIVERY_EXCHANGE,
    delay_route,
    delay_topology,
    destination_binding_key,
    parse_after,
)
from banyan_bus.envelope import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_DELAY,
    HEADER_PARTITION_KEY,
    Priority,
    encode,
)
from banyan_bus.errors import ConfigurationError, ContractError, HandlerError
from banyan_bus.handlers import HandlerSpec, function_handler
from banyan_bus.retry import RetryPolicy
from banyan_bus.topology import (
    DELAYED_PUBLISH_PATTERN,
    ROOT_EXCHANGE,
    QueueOptions,
    QueueType,
    check_group_name,
    declare_group,
    declare_root,
    delayed_publish_destination,
)
from banyan_bus.transport.base import Headers, Transport

log = structlog.get_logger("banyan_bus.bus")

M = TypeVar("M", bound=Message)

DEFAULT_URL = "memory://"
DEFAULT_CONCURRENCY = 10
DEFAULT_HANDLER_TIMEOUT = 120.0


def make_transport(url: str, *, name: str) -> Transport:
    """The transport for ``url``'s scheme: ``amqp(s)://`` or ``memory://``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("amqp", "amqps"):
        from banyan_bus.transport.amqp import AmqpTransport

        return AmqpTransport(url, name=name)
    if scheme == "memory":
        from banyan_bus.transport.memory import MemoryTransport

        return MemoryTransport(url)
    raise ConfigurationError(
        f"unsupported bus URL {url.split('@')[-1]!r}: use amqp://user:pass@host:5672/vhost "
        f"(or amqps://) for RabbitMQ, or memory:// for the in-process broker."
    )


class MessageBus:
    """A service's connection to the event bus: publish, subscribe, start, stop.

    ``service`` names the publisher in every envelope and is the default
    subscription group. ``url`` defaults to the ``BANYAN_URL`` environment
    variable, else ``memory://`` (the in-process broker).

    Options: ``queue_type`` ("quorum" or "classic") for new subscriptions;
    ``retry`` the default ``RetryPolicy``; ``handler_timeout`` seconds (default
    120); ``max_message_size`` bytes of an encoded envelope (default 256 KiB);
    ``grace_period`` seconds that ``stop()`` lets in-flight handlers finish.
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
        contracts: ContractRegistry | None = None,
    ) -> None:
        self.service = check_group_name(service, what="service")
        self.url = url or os.environ.get("BANYAN_URL") or DEFAULT_URL
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
        self.contracts = contracts or registry
        self._transport: Transport | None = None
        self._subscriptions: dict[tuple[str, str], Subscription] = {}
        self._consumers: list[SubscriptionConsumer] = []
        self._delays_declared = False
        self._delay_lock = asyncio.Lock()
        self._started = False
        self._log = log.bind(service=service)

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return f"<MessageBus service={self.service!r} url={self._display_url()!r} {state}>"

    def _display_url(self) -> str:
        return self._transport.display_url if self._transport else self.url.split("@")[-1]

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
    def transport(self) -> Transport:
        if self._transport is None:
            raise RuntimeError(f"{self!r} is not started: use `async with bus:` or `await bus.start()`")
        return self._transport

    async def start(self) -> None:
        """Connect, declare the topology of every subscription, start consuming."""
        if self._started:
            return
        transport = make_transport(self.url, name=self.service)
        await transport.connect()
        self._transport = transport
        try:
            await declare_root(transport)
            for sub in self._subscriptions.values():
                await self._declare(sub)
            for sub in self._subscriptions.values():
                await self._start_consumer(sub)
        except BaseException:
            await self._close_transport()
            raise
        self._started = True
        self._log.info("bus_started", url=transport.display_url, subscriptions=len(self._subscriptions))

    async def stop(self, grace_period: float | None = None) -> None:
        """Stop consuming, let in-flight handlers finish, return the rest, disconnect."""
        if self._transport is None:
            return
        grace = self.grace_period if grace_period is None else grace_period
        for consumer in self._consumers:
            await consumer.stop_consuming()
        for consumer in self._consumers:
            if not await consumer.wait_idle(grace):
                self._log.warning(
                    "grace_period_over",
                    group=consumer.subscription.group,
                    in_flight=consumer.in_flight,
                    detail="returning unfinished messages to the queue",
                )
                await consumer.cancel_in_flight()
        self._consumers.clear()
        await self._close_transport()
        self._started = False
        self._log.info("bus_stopped")

    async def _close_transport(self) -> None:
        transport, self._transport = self._transport, None
        self._delays_declared = False
        if transport is not None:
            await transport.close()

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
        timeout: float | None = -1.0,
        queue_type: QueueType | None = None,
        max_length: int | None = None,
    ) -> Subscription:
        """Handle ``contract`` events with ``handler`` in ``subscription_group``.

        Every group gets its own copy of each event; the instances (and
        subscriptions) of one group share its queue. Several handlers of one
        group run in the order they were subscribed. ``concurrency`` bounds
        handlers running at once (default 10); ``prefetch`` bounds unacked
        deliveries (default 3 × concurrency). Callable before or after ``start``.
        """
        return await self._add_handler(
            contract,
            function_handler(contract, handler),
            subscription_group=subscription_group,
            concurrency=concurrency,
            prefetch=prefetch,
            auto_ack=auto_ack,
            retry=retry,
            timeout=timeout,
            queue_type=queue_type,
            max_length=max_length,
        )

    async def _add_handler(
        self,
        contract: type[Message],
        spec: HandlerSpec,
        *,
        subscription_group: str | None,
        concurrency: int,
        prefetch: int | None,
        auto_ack: bool,
        retry: RetryPolicy | None,
        timeout: float | None,
        queue_type: QueueType | None,
        max_length: int | None,
    ) -> Subscription:
        if not (isinstance(contract, type) and issubclass(contract, Event)):
            raise ContractError(
                f"subscribe() takes an Event class, got {contract!r}; commands and queries "
                f"are handled with @CommandHandler / @QueryHandler."
            )
        if contract.is_abstract_contract():
            raise ContractError(f"{contract.__name__} is an abstract contract; subscribe to a concrete one.")
        group = check_group_name(subscription_group or self.service)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if prefetch is None:
            prefetch = 3 * concurrency
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 65535:
            raise ConfigurationError(
                f"prefetch must be an int from 1 to 65535 (unbounded prefetch is refused: it "
                f"defeats back-pressure), got {prefetch!r}"
            )
        if timeout == -1.0:
            timeout = self.handler_timeout
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        options = QueueOptions(queue_type=queue_type or self.queue_type, max_length=max_length)
        message_type = contract.__message_type__
        key = (group, message_type)
        sub = self._subscriptions.get(key)
        if sub is None:
            sub = Subscription(
                message_type=message_type,
                group=group,
                handlers=[spec],
                concurrency=concurrency,
                prefetch=prefetch,
                auto_ack=auto_ack,
                retry=retry or self.retry,
                timeout=timeout,
                queue=options,
            )
            self._subscriptions[key] = sub
            if self._started:
                await self._declare(sub)
                await self._start_consumer(sub)
            return sub
        if any(h.name == spec.name for h in sub.handlers):
            raise HandlerError(f"{spec.name} already handles {message_type} in group {group!r}")
        if self._started:
            raise HandlerError(
                f"group {group!r} is already consuming {message_type}; add its handlers "
                f"before bus.start() so they run in definition order from the first message."
            )
        if sub.queue != options or sub.auto_ack != auto_ack:
            raise ConfigurationError(
                f"group {group!r} already subscribes to {message_type} with queue options "
                f"{sub.queue} and auto_ack={sub.auto_ack}; handlers of one group share one "
                f"queue, so they must agree."
            )
        sub.handlers.append(spec)
        return sub

    async def _declare(self, sub: Subscription) -> None:
        transport = self.transport
        await declare_group(transport, sub.group, sub.message_type, sub.queue)
        if sub.retry.delayed:
            await self._ensure_delays()
            await transport.bind_exchange(
                sub.queue_name, DELIVERY_EXCHANGE, destination_binding_key(sub.queue_name)
            )

    async def _start_consumer(self, sub: Subscription) -> None:
        consumer = SubscriptionConsumer(
            sub,
            transport=self.transport,
            registry=self.contracts,
            ensure_delays=self._ensure_delays,
        )
        await consumer.start()
        self._consumers.append(consumer)

    async def _ensure_delays(self) -> None:
        """Declare the delay levels once per connection (idempotent on the broker)."""
        if self._delays_declared:
            return
        async with self._delay_lock:
            if self._delays_declared:
                return
            transport = self.transport
            topo = delay_topology()
            for exchange in topo.exchanges:
                await transport.declare_exchange(exchange.name, exchange.type)
            for queue in topo.queues:
                await transport.declare_queue(queue.name, arguments=dict(queue.arguments))
            for binding in topo.bindings:
                if binding.destination_kind == "queue":
                    await transport.bind_queue(binding.destination, binding.source, binding.routing_key)
                else:
                    await transport.bind_exchange(
                        binding.destination, binding.source, binding.routing_key
                    )
            await transport.bind_exchange(ROOT_EXCHANGE, DELIVERY_EXCHANGE, DELAYED_PUBLISH_PATTERN)
            self._delays_declared = True

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
    ) -> str: ...

    @overload
    async def publish(
        self,
        message: type[Message],
        data: dict[str, Any],
        *,
        priority: Priority = "normal",
        wait_for_confirmation: bool = True,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        after: int | float | str | Any | None = None,
        partition_key: str | None = None,
    ) -> str: ...

    async def publish(
        self,
        message: Message | type[Message],
        data: dict[str, Any] | None = None,
        *,
        priority: Priority = "normal",
        wait_for_confirmation: bool = True,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        after: int | float | str | Any | None = None,
        partition_key: str | None = None,
    ) -> str:
        """Publish an event to every subscribed group; returns its message id.

        ``message`` is a contract instance, or a contract class with ``data``
        (a dict validated into it: pydantic's ``ValidationError`` if it does not
        fit, nothing sent). With ``wait_for_confirmation`` (the default) this
        returns once the broker has stored the event on every bound queue.
        ``after`` delays delivery ("10 seconds", 1500 ms, an ISO time; at most a
        year). Publishing to a type nobody subscribes to is not an error.
        """
        event = self._coerce(message, data)
        ctx = current_context()
        causation_id = None
        if ctx is not None:
            causation_id = ctx.id
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
        outgoing = encode(
            event,
            correlation_id=correlation_id,
            causation_id=causation_id,
            service_name=self.service,
            priority=priority,
            headers=extra,
            max_size=self.max_message_size,
        )
        transport = self.transport
        message_type = type(event).__message_type__
        if delay_ms is None:
            exchange, routing_key = ROOT_EXCHANGE, routing_key_for(message_type)
        else:
            await self._ensure_delays()
            route = delay_route(delay_ms, delayed_publish_destination(message_type))
            exchange, routing_key = route.exchange, route.routing_key
        await transport.publish(exchange, routing_key, outgoing, confirm=wait_for_confirmation)
        return outgoing.message_id or ""

    def _coerce(self, message: Message | type[Message], data: dict[str, Any] | None) -> Message:
        if isinstance(message, type) and issubclass(message, Message):
            if data is None:
                raise ContractError(
                    f"publish({message.__name__}) needs the event's data: "
                    f"publish({message.__name__}, {{...}}) or publish({message.__name__}(...))"
                )
            event = message.model_validate(data)
        elif isinstance(message, Message):
            if data is not None:
                raise ContractError("publish(instance, data): give an instance or a class with data, not both")
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
