"""The memory broker (one RabbitMQ vhost) and the process-wide registry of brokers.

The broker owns the tables (exchanges, queues, connections, direct reply-to
addresses) and the two operations that cross them: routing a message through
exchange-to-exchange bindings onto queues, and dead-lettering a message out of
one queue through its dead-letter exchange. Queues get the dead-letter
callback and the sequence counter from here, so they never import the broker.

All transports with the same URL in one process share one broker, so two buses
("two services") in one process talk to each other. The broker is
single-threaded: every operation runs synchronously on the event loop.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Final

from banyan_bus.errors import ConfigurationError, TopologyError, TopologyMismatch
from banyan_bus.transport.base import (
    DEFAULT_EXCHANGE,
    Arguments,
    Delivery,
    Headers,
    OutgoingMessage,
)
from banyan_bus.transport.memory.death import is_cycle, with_death
from banyan_bus.transport.memory.delivery import Connection
from banyan_bus.transport.memory.exchange import EXCHANGE_TYPES, PREDECLARED, Binding, Exchange
from banyan_bus.transport.memory.queue import Message, Queue

log = logging.getLogger("banyan_bus.transport.memory")

SCHEME: Final = "memory://"


class MemoryBroker:
    """One in-process broker (a "vhost"), shared by every transport with its URL."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.exchanges: dict[str, Exchange] = {"": Exchange("", "direct", True, {})}
        for exchange_name, exchange_type in PREDECLARED.items():
            self.exchanges[exchange_name] = Exchange(exchange_name, exchange_type, True, {})
        self.queues: dict[str, Queue] = {}
        self.connections: set[Connection] = set()
        self.sequence = itertools.count()
        #: Every publish to an exchange, in order, when ``recording`` (banyan_bus.testing).
        self.recording = False
        self.journal: list[tuple[str, str, OutgoingMessage]] = []
        #: Direct reply-to addresses: routing key on the default exchange -> callback.
        self.reply_routes: dict[str, Callable[[Delivery], None]] = {}

    def busy(self) -> bool:
        """Whether a consumed queue still holds work: ready messages or unacked ones."""
        if any(connection.unacked for connection in self.connections):
            return True
        return any(queue.ready and queue.consumers for queue in self.queues.values())

    # -- connections

    def open_connection(self) -> Connection:
        connection = Connection(self._forget)
        self.connections.add(connection)
        return connection

    def _forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        for address in connection.reply_addresses:
            self.reply_routes.pop(address, None)

    def close_all_connections(self) -> None:
        """Fault hook (``rabbitmqctl close_all_connections``): every transport's
        consumers stop, its unacked messages return to their queues, it is closed."""
        for connection in list(self.connections):
            connection.close()

    def shutdown(self) -> None:
        self.close_all_connections()
        for queue in self.queues.values():
            queue.delete()

    # -- topology

    def exchange(self, name: str, action: str) -> Exchange:
        found = self.exchanges.get(name)
        if found is None:
            raise TopologyError(f"cannot {action}: exchange {name!r} does not exist (NOT_FOUND)")
        return found

    def queue(self, name: str, action: str) -> Queue:
        found = self.queues.get(name)
        if found is None:
            raise TopologyError(f"cannot {action}: queue {name!r} does not exist (NOT_FOUND)")
        return found

    def declare_exchange(self, name: str, type: str, durable: bool, arguments: Arguments) -> None:
        args = dict(arguments)
        existing = self.exchanges.get(name)
        if existing is not None:
            requested: dict[str, object] = {"type": type, "durable": durable, **args}
            if existing.describe() != requested:
                raise TopologyMismatch("exchange", name, existing.describe(), requested)
            return
        if name == DEFAULT_EXCHANGE or name.startswith("amq."):
            raise TopologyError(f"exchange name {name!r} is reserved (ACCESS_REFUSED)")
        if type not in EXCHANGE_TYPES:
            raise TopologyError(f"exchange {name!r}: unknown exchange type {type!r}")
        self.exchanges[name] = Exchange(name, type, durable, args)

    def declare_queue(self, name: str, durable: bool, arguments: Arguments) -> None:
        if not name or name.startswith("amq."):
            raise TopologyError(f"queue name {name!r} is empty or reserved (ACCESS_REFUSED)")
        queue = Queue(
            name, durable, arguments, dead_letter=self.dead_letter, sequence=self.sequence
        )
        existing = self.queues.get(name)
        if existing is None:
            self.queues[name] = queue
        elif existing.describe() != queue.describe():
            raise TopologyMismatch("queue", name, existing.describe(), queue.describe())

    def bind(self, source: str, binding: Binding) -> None:
        kind = "exchange" if binding.to_exchange else "queue"
        action = f"bind {kind} {binding.destination!r} to {source!r}"
        if binding.to_exchange:
            self.exchange(binding.destination, action)
        else:
            self.queue(binding.destination, action)
        exchange = self.exchange(source, action)
        if source == DEFAULT_EXCHANGE:
            raise TopologyError(f"cannot {action}: the default exchange takes no bindings")
        exchange.bind(binding)

    def delete_queue(self, name: str) -> None:
        found = self.queues.pop(name, None)
        if found is not None:
            found.delete()
            for exchange in self.exchanges.values():
                exchange.unbind(name, to_exchange=False)

    def delete_exchange(self, name: str) -> None:
        if name == DEFAULT_EXCHANGE or name.startswith("amq."):
            raise TopologyError(f"exchange {name!r} cannot be deleted (ACCESS_REFUSED)")
        if self.exchanges.pop(name, None) is not None:
            for exchange in self.exchanges.values():
                exchange.unbind(name, to_exchange=True)

    # -- messages

    def route(self, source: Exchange, routing_key: str, headers: Headers) -> list[Queue]:
        """Every queue the message reaches, each once, following exchange bindings."""
        if source.name == DEFAULT_EXCHANGE:
            queue = self.queues.get(routing_key)
            return [] if queue is None else [queue]
        found: dict[str, Queue] = {}
        visited: set[str] = set()  # also what stops exchange-binding cycles
        pending = [source]
        while pending:
            exchange = pending.pop()
            if exchange.name in visited:
                continue
            visited.add(exchange.name)
            for binding in exchange.matching(routing_key, headers):
                if binding.to_exchange:
                    if (nxt := self.exchanges.get(binding.destination)) is not None:
                        pending.append(nxt)
                elif (queue := self.queues.get(binding.destination)) is not None:
                    found.setdefault(queue.name, queue)
        return list(found.values())

    def dead_letter(self, queue: Queue, message: Message, reason: str) -> None:
        """Republish through the queue's dead-letter exchange, or drop without one."""
        if queue.dead_letter_exchange is None:
            return
        target = self.exchanges.get(queue.dead_letter_exchange)
        if target is None:
            log.warning(
                "queue %r dead-letters to exchange %r, which does not exist: message dropped",
                queue.name,
                queue.dead_letter_exchange,
            )
            return
        routing_key = queue.dead_letter_routing_key
        if routing_key is None:
            routing_key = message.routing_key
        headers = with_death(
            message.properties.headers,
            queue=queue.name,
            reason=reason,
            exchange=message.exchange,
            routing_key=message.routing_key,
        )
        properties = replace(message.properties, headers=headers)
        for destination in self.route(target, routing_key, headers):
            if reason == "rejected" or not is_cycle(headers, destination.name):
                destination.offer(properties, target.name, routing_key, queue.at_least_once)


# -- the process-wide registry: memory://<name> -> its broker

_brokers: dict[str, MemoryBroker] = {}


def broker_name(url: str) -> str:
    """The broker name of a ``memory://[name]`` URL; anything else is a ConfigurationError."""
    if not url.startswith(SCHEME):
        raise ConfigurationError(f"not a memory transport URL: {url!r} (use 'memory://[name]')")
    return url[len(SCHEME) :].strip("/")


def get_broker(url: str) -> MemoryBroker:
    """The process-wide broker for ``memory://<name>``, created on first use."""
    name = broker_name(url)
    broker = _brokers.get(name)
    if broker is None:
        broker = _brokers[name] = MemoryBroker(name)
    return broker


def drop_broker(url: str) -> None:
    """Close and forget the broker of ``url`` (a test's private broker)."""
    broker = _brokers.pop(broker_name(url), None)
    if broker is not None:
        broker.shutdown()


def reset_brokers() -> None:
    """Drop every broker (tests): their connections close, their timers stop."""
    for broker in list(_brokers.values()):
        broker.shutdown()
    _brokers.clear()
