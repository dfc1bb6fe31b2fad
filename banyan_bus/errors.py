"""Every error banyan_bus raises, under one root.

Third-party errors (aio-pika, aiormq) never leak: the transport maps them here
at the edge, chaining the original with ``raise ... from exc``.

::

    BanyanError
    ├── ContractError             a contract class or payload is wrong (your code)
    ├── ConfigurationError        a bus option or URL is wrong (your configuration)
    ├── PayloadTooLarge           an encoded envelope is over the size limit
    ├── TopologyError             the broker's topology refuses ours
    │   ├── TopologyMismatch      an exchange/queue exists with other arguments
    │   └── PluginMissing         a broker plugin we need is not enabled
    ├── BrokerUnreachable         (also a ConnectionError) the broker did not answer
    ├── PublishError              a publish was not confirmed
    │   ├── BusCapacityExceeded   the broker nacked it (a full or leaderless queue)
    │   └── Unroutable            a mandatory publish reached no queue
    ├── SettleError               an ack/nack/reject found its connection gone
    ├── HandlerError              a handler cannot be registered or built
    │   └── DependencyError       a handler dependency cannot be resolved
    ├── RequestTimeout            a command/query got no answer in time
    ├── RemoteHandlerError        the remote command/query handler raised
    ├── IdempotencyStoreError     the idempotency store (Redis) did not answer
    ├── IdempotencyKeyBusy        another worker is handling this message right now
    └── EventStoreError           the event store's database failed
        └── ConcurrencyError      a stream moved on since it was read (expected_version)
"""

from __future__ import annotations


class BanyanError(Exception):
    """Root of every banyan_bus error: ``except BanyanError`` catches them all."""


class ContractError(BanyanError, TypeError):
    """A contract class is defined wrongly (name, version, duplicate).

    Raised when the class is defined, so the mistake shows at import time.
    Fix the class definition as the message says.
    """


class ConfigurationError(BanyanError, ValueError):
    """A bus option, subscription option or URL is invalid. Fix the call."""


class PayloadTooLarge(BanyanError, ValueError):
    """The encoded envelope is larger than ``max_message_size``.

    Raised by ``publish`` before anything is sent. Send a reference (an id,
    a URL to blob storage) instead of the data, or raise the limit on the bus.
    """

    def __init__(self, message_type: str, size: int, limit: int) -> None:
        self.message_type = message_type
        self.size = size
        self.limit = limit
        super().__init__(
            f"{message_type} encodes to {size} bytes, over the limit of {limit} bytes; "
            f"nothing was sent. Publish a reference to the data instead, or raise "
            f"MessageBus(max_message_size=...)."
        )


class TopologyError(BanyanError):
    """The broker refused a declaration."""


class TopologyMismatch(TopologyError):
    """An exchange or queue already exists with other arguments.

    RabbitMQ never changes a declared queue's arguments; delete the queue (after
    draining it) or declare the subscription with the arguments it already has.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        existing: dict[str, object] | None,
        requested: dict[str, object],
        detail: str = "",
    ) -> None:
        self.kind = kind
        self.name = name
        self.existing = existing
        self.requested = requested
        have = "unknown (the broker did not say)" if existing is None else repr(existing)
        super().__init__(
            f"{kind} {name!r} already exists with other arguments: broker has {have}, "
            f"this service declares {requested!r}. {detail}".rstrip()
        )


class PluginMissing(TopologyError):
    """A RabbitMQ plugin the topology needs is not enabled on the broker."""


class BrokerUnreachable(BanyanError, ConnectionError):
    """The broker did not accept a connection (down, wrong host/port or credentials).

    The URL in the message never contains the password.
    """


class PublishError(BanyanError):
    """The broker did not confirm a publish; the message may not have been stored.

    Nothing was reported as sent. Retry the publish (consumers must tolerate
    duplicates) or surface the failure to your caller.
    """


class BusCapacityExceeded(PublishError):
    """The broker refused the message (a publisher-confirm nack): a queue bound to the
    destination is full (``max_length`` with reject-publish) or cannot accept it now (a
    quorum queue without a leader while a node is down or partitioned). Retryable: the
    message is not confirmed, and may or may not have reached other queues."""


class Unroutable(PublishError):
    """A publish that had to reach a queue (a command, a replay) reached none."""


class SettleError(BanyanError):
    """An ack, nack or reject could not reach the broker: the delivery's channel
    (or connection) closed after the message was delivered.

    The broker has already returned the message to its queue and will deliver
    it again, so nothing is lost; the delivery counts as settled here. Log it
    and move on (handlers must tolerate the redelivery). Settling a delivery
    twice is a different thing, a programming error: ``RuntimeError``.
    """


class HandlerError(BanyanError, TypeError):
    """A handler cannot be registered: wrong signature, wrong contract, bad options."""


class DependencyError(HandlerError):
    """A handler's constructor parameter cannot be resolved from the container.

    Raised by ``bus.start()``, naming the handler class and the parameter, so a
    wiring mistake never waits for the first message.
    """


class RequestTimeout(BanyanError, TimeoutError):
    """A command or query got no answer within its timeout.

    The owning service may be down, slow, or absent. The command may still be
    handled later: commands must be safe to retry.
    """


class RemoteHandlerError(BanyanError):
    """The remote command/query handler raised.

    ``error_type`` and ``error_message`` describe the remote exception; its
    traceback stays on the remote side unless the remote bus is configured to
    share it.
    """

    def __init__(self, message_type: str, error_type: str, error_message: str) -> None:
        self.message_type = message_type
        self.error_type = error_type
        self.error_message = error_message
        super().__init__(f"{message_type} handler raised {error_type}: {error_message}")


class IdempotencyStoreError(BanyanError):
    """The idempotency store did not answer (Redis down, timed out, refused the command).

    Raised by a store operation, never for "busy" or "done". The engine treats it
    as a failed attempt and retries later: running the handler without the store
    would break the effectively-once promise. Check that the store (its URL is in
    the message, without the password) is up.
    """


class IdempotencyKeyBusy(BanyanError):
    """Another worker holds an unexpired claim on this key: a duplicate is running now.

    Raised by :func:`guard` instead of running the handler. The caller should
    try the message again later (not drop it: the other worker may still fail
    and release its claim, or die and let its lease expire).
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"idempotency key {key!r} is claimed by another worker that is handling the same "
            f"message right now; try again later"
        )


class EventStoreError(BanyanError):
    """The event store's database failed or is unreachable (a driver error, chained).

    Retry later, or check the database URL/path; nothing of the failed call was committed.
    """


class ConcurrencyError(EventStoreError):
    """The stream moved on since it was read: ``expected_version`` is not its version.

    Another writer appended first. Nothing was written. Reload the aggregate from
    ``read_stream``, re-apply the command, and append again (or give up and tell the
    caller). ``actual`` is the stream's version when the append was refused.
    """

    def __init__(self, stream: str, expected: object, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream!r} is at version {actual}, but the append expected "
            f"{expected!r}: another writer appended first; reload the stream and retry"
        )
