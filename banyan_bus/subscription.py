"""A subscription as one value: its options, checked once, and what the engine runs.

``SubscriptionOptions`` is what a user says about a subscription — the keyword
arguments of ``bus.subscribe``, ``@bus.handler`` and ``@EventHandler`` (and the
two that ``@CommandHandler`` / ``@QueryHandler`` take). It is frozen and checks
itself when built, so a wrong option fails where it is written (at the
decorator, or the ``subscribe`` call), naming the option and what would be
right. Adding an option means adding a field here.

Some options mean "the bus's setting" when left out (the group is the
service, the queue type, the retry policy and the handler timeout are the
bus's); the options do not know the bus, so ``Subscription.create`` fills those
in when a bus records the subscription.

``Subscription`` is the resolved result: one group's subscription to one
message type, its queue and its handlers, as the consumer engine reads it.

Example::

    options = SubscriptionOptions(subscription_group="welcome", concurrency=5)
    options.prefetch_count      # 15: three deliveries waiting per running handler
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from banyan_bus.contracts import Event, Message
from banyan_bus.errors import ConfigurationError, ContractError, HandlerError
from banyan_bus.idempotency import Deduplicator, IdempotencyStore
from banyan_bus.middleware import Middleware
from banyan_bus.middleware import check as check_middleware
from banyan_bus.retry import RetryPolicy
from banyan_bus.topology import (
    DEFAULT_PARTITIONS,
    QueueOptions,
    QueueType,
    check_group_name,
    dead_letter_queue,
    group_exchange,
    ordered_queue,
)

if TYPE_CHECKING:  # handlers.py builds SubscriptionOptions; this is only a type
    from banyan_bus.handlers import HandlerSpec

DEFAULT_CONCURRENCY = 10
DEFAULT_HANDLER_TIMEOUT = 120.0
#: Unacked deliveries per running handler when ``prefetch`` is not given.
PREFETCH_PER_HANDLER = 3
_MAX_PREFETCH = 65535  # AMQP's prefetch-count is a 16-bit field


class _BusDefault:
    """Marks "use the bus's setting" where ``None`` already means something."""

    def __repr__(self) -> str:
        return "<bus default>"


#: The default of ``timeout``: the bus's ``handler_timeout`` (``None`` means no timeout).
BUS_DEFAULT: Any = _BusDefault()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionOptions:
    """How one handler subscribes: validated when built, never changed after.

    The fields are ``bus.subscribe``'s keyword arguments, with its defaults:
    ``subscription_group`` (the service), ``concurrency`` 10, ``prefetch``
    3 x concurrency, ``auto_ack`` True, ``retry`` and ``queue_type`` the bus's,
    ``timeout`` the bus's ``handler_timeout`` (``None``: no timeout),
    ``max_length`` none, ``ordered`` False with ``partitions`` 4 when ordered,
    ``idempotent`` False, ``idempotency_key`` none (the event id), ``middleware``
    none (run around this handler, inside the bus's: see ``banyan_bus.middleware``).

    Raises ``ConfigurationError`` naming the option and what it accepts.
    """

    subscription_group: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    prefetch: int | None = None
    auto_ack: bool = True
    retry: RetryPolicy | None = None
    timeout: float | None = BUS_DEFAULT
    queue_type: QueueType | None = None
    max_length: int | None = None
    ordered: bool = False
    partitions: int | None = None
    idempotent: bool = False
    idempotency_key: Callable[[Any], str] | None = None
    middleware: Sequence[Middleware] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "middleware", check_middleware(self.middleware))
        if self.subscription_group is not None:
            check_group_name(self.subscription_group)
        if not _is_int(self.concurrency) or self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {self.concurrency!r}")
        if self.prefetch is not None and not _is_int(self.prefetch):
            self._refuse_prefetch(self.prefetch)
        if not 1 <= self.prefetch_count <= _MAX_PREFETCH:
            self._refuse_prefetch(self.prefetch_count)
        for name in ("auto_ack", "ordered", "idempotent"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"{name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError(
                f"retry must be a RetryPolicy (or None for the bus's), got {self.retry!r}"
            )
        timeout = self.timeout
        if timeout is not BUS_DEFAULT and timeout is not None and not _is_positive(timeout):
            raise ConfigurationError(f"timeout must be > 0 seconds or None, got {self.timeout!r}")
        self.queue_options("quorum")  # checks queue_type and max_length
        if self.partitions is not None:
            if not self.ordered:
                raise ConfigurationError("partitions= only applies with ordered=True")
            if not _is_int(self.partitions) or self.partitions < 1:
                raise ConfigurationError(f"partitions must be an int >= 1, got {self.partitions!r}")
        if self.deduplicated:
            if not self.auto_ack:
                raise ConfigurationError(
                    "idempotent handlers need auto_ack=True: the bus must know whether the "
                    "handler succeeded to mark the event done"
                )
            if self.idempotency_key is not None and not callable(self.idempotency_key):
                raise ConfigurationError(
                    f"idempotency_key must be a function of the event, got {self.idempotency_key!r}"
                )

    @staticmethod
    def _refuse_prefetch(value: object) -> None:
        raise ConfigurationError(
            f"prefetch must be an int from 1 to {_MAX_PREFETCH} (unbounded prefetch is refused: "
            f"it defeats back-pressure), got {value!r}"
        )

    @classmethod
    def from_options(
        cls,
        options: Mapping[str, Any],
        *,
        allowed: frozenset[str] | None = None,
        owner: str | None = None,
    ) -> SubscriptionOptions:
        """Build from a decorator's ``**options``, refusing names it does not take.

        ``allowed`` narrows the names (``REQUEST_OPTIONS`` for commands and
        queries); ``owner`` (a class name) prefixes the error messages.
        """
        valid = OPTION_NAMES if allowed is None else allowed
        where = f"{owner}: " if owner else ""
        unknown = set(options) - valid
        if unknown:
            raise HandlerError(
                f"{where}unknown option(s) {sorted(unknown)}; valid: {sorted(valid)}"
            )
        try:
            return cls(**options)
        except ConfigurationError as exc:
            if not owner:
                raise
            raise ConfigurationError(f"{where}{exc}") from exc

    # -- values the options imply --------------------------------------------------

    @property
    def prefetch_count(self) -> int:
        """``prefetch``, or 3 x ``concurrency`` when not given."""
        if self.prefetch is not None:
            return self.prefetch
        return PREFETCH_PER_HANDLER * self.concurrency

    @property
    def partition_count(self) -> int:
        """How many partition queues: ``partitions`` (default 4) when ordered, else 1."""
        if not self.ordered:
            return 1
        return DEFAULT_PARTITIONS if self.partitions is None else self.partitions

    @property
    def deduplicated(self) -> bool:
        """Whether handlers run once per event id (or ``idempotency_key``)."""
        return self.idempotent or self.idempotency_key is not None

    def queue_options(self, bus_queue_type: QueueType) -> QueueOptions:
        """The queue's declaration options, ``queue_type`` defaulting to the bus's."""
        return QueueOptions(
            queue_type=self.queue_type or bus_queue_type, max_length=self.max_length
        )

    def handler_timeout(self, bus_timeout: float | None) -> float | None:
        """Seconds a handler may run: ``timeout``, or the bus's when not given."""
        return bus_timeout if self.timeout is BUS_DEFAULT else self.timeout


#: Every option name (what ``@EventHandler`` and ``@bus.handler`` accept).
OPTION_NAMES = frozenset(f.name for f in fields(SubscriptionOptions))
#: What ``@CommandHandler`` and ``@QueryHandler`` accept: one owner, no group or queue.
REQUEST_OPTIONS = frozenset({"concurrency", "timeout", "middleware"})


def event_type_of(contract: object) -> str:
    """The message type of ``contract`` if it can be subscribed to (a concrete Event)."""
    if not (isinstance(contract, type) and issubclass(contract, Event)):
        raise ContractError(
            f"subscribe() takes an Event class, got {contract!r}; commands and queries "
            f"are handled with @CommandHandler / @QueryHandler."
        )
    if contract.is_abstract_contract():
        raise ContractError(
            f"{contract.__name__} is an abstract contract; subscribe to a concrete one."
        )
    return contract.__message_type__


@dataclass(slots=True)
class Subscription:
    """One group's subscription to one message type: its queue and its handlers."""

    message_type: str
    group: str
    handlers: list[HandlerSpec]
    concurrency: int
    prefetch: int
    auto_ack: bool
    retry: RetryPolicy
    timeout: float | None
    queue: QueueOptions = field(default_factory=QueueOptions)
    ordered: bool = False
    partitions: int = 1
    dedup: Deduplicator[Message] | None = None

    @classmethod
    def create(
        cls,
        message_type: str,
        handler: HandlerSpec,
        options: SubscriptionOptions,
        *,
        group: str,
        queue_type: QueueType,
        retry: RetryPolicy,
        timeout: float | None,
        idempotency_store: IdempotencyStore,
        idempotency_ttl: float,
    ) -> Subscription:
        """The subscription ``options`` describe, the bus's settings filling the gaps.

        ``group``, ``queue_type``, ``retry`` and ``timeout`` are the bus's
        (``group`` already resolved); ``options`` win where they say something.
        """
        policy = options.retry or retry
        handler_timeout = options.handler_timeout(timeout)
        dedup: Deduplicator[Message] | None = None
        if options.deduplicated:
            # The lease outlives every immediate attempt of a live handler (idempotency.py).
            attempt_s = handler_timeout if handler_timeout is not None else DEFAULT_HANDLER_TIMEOUT
            dedup = Deduplicator(
                idempotency_store,
                group=group,
                lease=attempt_s * (1 + policy.immediate) + 30,
                ttl=idempotency_ttl,
                key=options.idempotency_key,
            )
        return cls(
            message_type=message_type,
            group=group,
            handlers=[handler],
            concurrency=options.concurrency,
            prefetch=options.prefetch_count,
            auto_ack=options.auto_ack,
            retry=policy,
            timeout=handler_timeout,
            queue=options.queue_options(queue_type),
            ordered=options.ordered,
            partitions=options.partition_count,
            dedup=dedup,
        )

    def join(
        self, handler: HandlerSpec, options: SubscriptionOptions, *, queue_type: QueueType
    ) -> None:
        """Add another handler of this group; its queue options must agree with ours.

        Handlers of one group share its queue, so they cannot ask for another
        queue type, length, acknowledgement mode or partitioning.
        """
        if (
            self.queue != options.queue_options(queue_type)
            or self.auto_ack != options.auto_ack
            or self.ordered != options.ordered
            or (self.ordered and self.partitions != options.partition_count)
        ):
            raise ConfigurationError(
                f"group {self.group!r} already subscribes to {self.message_type} with queue "
                f"options {self.queue}, auto_ack={self.auto_ack}, ordered={self.ordered}; "
                f"handlers of one group share its queue, so they must agree."
            )
        self.handlers.append(handler)

    @property
    def queue_name(self) -> str:
        """The group's exchange, and its queue when the subscription is not ordered."""
        return group_exchange(self.group, self.message_type)

    @property
    def queue_names(self) -> list[str]:
        """Every queue this subscription consumes: its own, or (ordered) its group's
        ordered stream's partition queues, which it shares with the group's other
        ordered subscriptions (``topology.ordered_plan``)."""
        if self.ordered:
            return [ordered_queue(self.group, i) for i in range(self.partitions)]
        return [self.queue_name]

    @property
    def dlq_name(self) -> str:
        return dead_letter_queue(self.group, self.message_type)


def ordered_stream(subscriptions: Iterable[Subscription], group: str) -> list[Subscription]:
    """``group``'s ordered subscriptions, which share one ordered stream (its partition
    queues), so they must agree on ``partitions``, ``queue_type`` and ``max_length``.

    Raises ``ConfigurationError`` naming both subscriptions and what differs.
    """
    ordered = [s for s in subscriptions if s.ordered and s.group == group]
    for other in ordered[1:]:
        first = ordered[0]
        if (other.partitions, other.queue) != (first.partitions, first.queue):
            raise ConfigurationError(
                f"group {group!r}'s ordered subscriptions share one ordered stream (one set of "
                f"partition queues, so a key's events of all types keep their order), so they "
                f"must agree: {first.message_type} has partitions={first.partitions}, "
                f"{first.queue}; {other.message_type} has partitions={other.partitions}, "
                f"{other.queue}. Give every ordered subscription of the group the same "
                f"partitions= (default 4), queue_type= and max_length=."
            )
    return ordered
