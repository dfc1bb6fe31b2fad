"""Versions side by side: how a message of one version is read as another.

A message type can have several versions at once (``UserCreated`` v1 and v2)
while services are deployed one by one, so the reader of a message and its
writer may not agree on the version. Three converters bridge them:

- an **upcaster** turns an older version into a newer one, so one ``handle``
  serves both (the subscriber upgraded first);
- a **downcaster** reads a newer version as an older one (the publisher
  upgraded first); by default an additive change needs none, because the newer
  payload validates as the older contract;
- **publish_versions** pins what a publisher emits while its subscribers catch up.

:class:`VersionReader` decides once per incoming version, per subscription, how
it is read and by which handlers, so the cost per message is a dict lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from banyan_bus.contracts import ContractRegistry, Message
from banyan_bus.envelope import DecodeError, Envelope, decode
from banyan_bus.errors import ConfigurationError, ContractError, HandlerError
from banyan_bus.transport.base import Delivery

if TYPE_CHECKING:
    from banyan_bus.handlers import HandlerSpec

M1 = TypeVar("M1", bound=Message)
M2 = TypeVar("M2", bound=Message)

# -- upcasters ------------------------------------------------------------------------

Upcast = Callable[[Any], Any]
_upcasters: dict[tuple[str, int], tuple[type[Message], Upcast]] = {}


def upcaster(old: type[M1], new: type[M2]) -> Callable[[Callable[[M1], M2]], Callable[[M1], M2]]:
    """Register a function that turns ``old`` (version n) into ``new`` (a later version).

    Chains compose: v1→v2 and v2→v3 let a v3 ``handle`` serve v1 messages.

    Example::

        @upcaster(UserCreated, UserCreatedV2)
        def v1_to_v2(old: UserCreated) -> UserCreatedV2:
            return UserCreatedV2(**old.model_dump(exclude={"created_at"}))
    """
    if old.__message_type__ != new.__message_type__ or (
        old.__message_version__ >= new.__message_version__
    ):
        raise HandlerError(
            f"@upcaster({old.__name__}, {new.__name__}) must go from an older to a newer "
            f"version of one message type"
        )

    def register(fn: Callable[[M1], M2]) -> Callable[[M1], M2]:
        _upcasters[(old.__message_type__, old.__message_version__)] = (new, fn)
        return fn

    return register


def upcast_chain(message_type: str, source: int, target: int) -> list[Upcast] | None:
    """The upcasters that turn ``source`` into ``target``, or None if there is no chain."""
    chain: list[Upcast] = []
    version = source
    while version != target:
        step = _upcasters.get((message_type, version))
        if step is None or step[0].__message_version__ > target:
            return None
        chain.append(step[1])
        version = step[0].__message_version__
    return chain


# -- downcasters and tolerant reading -------------------------------------------------

_downcasters: dict[tuple[str, int], tuple[type[Message], Upcast]] = {}


def downcaster(new: type[M1], old: type[M2]) -> Callable[[Callable[[M1], M2]], Callable[[M1], M2]]:
    """Register how to read ``new`` (version n) as ``old`` (an earlier version).

    The mirror of ``@upcaster``, written by whoever introduces the new version:
    subscribers still serving ``old`` then receive ``new`` events as ``old``
    during a rolling deploy, and a publisher pinned to ``old``
    (``MessageBus(publish_versions=...)``) emits it. Chains compose (v3→v2→v1).
    Without a downcaster a newer event is read as an older version when its
    payload validates as that version (an additive change).

    Example::

        @downcaster(UserCreatedV2, UserCreated)
        def v2_to_v1(new: UserCreatedV2) -> UserCreated:
            return UserCreated(**new.model_dump(exclude={"preferences"}), created_at=EPOCH)
    """
    if old.__message_type__ != new.__message_type__ or (
        old.__message_version__ >= new.__message_version__
    ):
        raise HandlerError(
            f"@downcaster({new.__name__}, {old.__name__}) must go from a newer to an older "
            f"version of one message type"
        )

    def register(fn: Callable[[M1], M2]) -> Callable[[M1], M2]:
        _downcasters[(new.__message_type__, new.__message_version__)] = (old, fn)
        return fn

    return register


def downcast_chain(message_type: str, source: int, target: int) -> list[Upcast] | None:
    """The downcasters that turn ``source`` into the older ``target``, or None."""
    chain: list[Upcast] = []
    version = source
    while version != target:
        step = _downcasters.get((message_type, version))
        if step is None or step[0].__message_version__ < target:
            return None
        chain.append(step[1])
        version = step[0].__message_version__
    return chain


def read_as(message: Message, contract: type[M2]) -> M2:
    """``message`` as another version ``contract`` of its message type.

    Through the registered upcasters or downcasters when a chain leads there,
    else by validating its wire payload as ``contract`` (which works for an
    additive change). Raises ``ContractError`` naming both versions otherwise.
    """
    source = type(message)
    if source is contract and isinstance(message, contract):
        return message
    message_type = source.__message_type__
    old, new = source.__message_version__, contract.__message_version__
    what = f"{message_type} v{old} cannot be read as v{new} ({contract.__name__})"
    if message_type != contract.__message_type__:
        raise ContractError(f"{source.__name__} and {contract.__name__} are different types")
    chain = (
        upcast_chain(message_type, old, new)
        if old < new
        else downcast_chain(message_type, old, new)
    )
    try:
        if chain is None:
            wire = source.__pydantic_serializer__.to_python(message, mode="json", by_alias=True)
            return contract.model_validate(wire)
        result: Any = message
        for step in chain:
            result = step(result)
    except ValidationError as exc:
        direction = "upcaster" if old < new else "downcaster"
        raise ContractError(
            f"{what}: {_first_error(exc)}; declare a @{direction}({source.__name__}, "
            f"{contract.__name__}) that says how"
        ) from exc
    except Exception as exc:
        raise ContractError(f"{what}: its converter raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, contract):
        raise ContractError(f"{what}: its converter returned {type(result).__name__}")
    return result


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "it does not validate"
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "payload"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


class _ReadAs(ContractRegistry):
    """``registry`` with version ``version`` of ``message_type`` decoded as ``contract``.

    Tolerant reading re-decodes the delivery through this view, so a newer
    payload is held to exactly the checks an older one gets.
    """

    def __init__(
        self, base: ContractRegistry, message_type: str, version: int, contract: type[Message]
    ) -> None:
        super().__init__()
        self._base = base
        self._key = (message_type, version)
        self._contract = contract

    def get(self, message_type: str, version: int) -> type[Message] | None:
        if (message_type, version) == self._key:
            return self._contract
        return self._base.get(message_type, version)

    def versions(self, message_type: str) -> dict[int, type[Message]]:
        versions = self._base.versions(message_type)
        if message_type == self._key[0]:
            versions[self._key[1]] = self._contract
        return versions


@dataclass(frozen=True, slots=True)
class _Plan:
    """How a group reads one incoming version: directly, or as an older one.

    ``older`` lists, newest first, the served versions to try and the
    downcaster chain to each (None: re-validate the payload as that version).
    """

    direct: bool
    older: tuple[tuple[int, list[Upcast] | None], ...]


_MAX_PLANS = 64  # versions come off the wire: the cache of plans has a bound


class VersionReader:
    """How one subscription's handlers read each version of its message type.

    A group reads a message as one version: its own when a handler serves it,
    else (tolerant reading, for rolling deploys) the newest older served
    version it can be read as, through ``@downcaster`` chains or by
    re-validating the payload as that version. What cannot be read goes to the
    DLQ as ``unknown-version``, saying which versions were tried, and can be
    replayed once the group serves it. The way to read each version is worked
    out once, not per message.
    """

    def __init__(
        self,
        message_type: str,
        handlers: list[HandlerSpec],
        registry: ContractRegistry,
        group: str,
    ) -> None:
        self.message_type = message_type
        self._registry = registry
        self._group = group
        served = sorted({v for h in handlers for v in h.versions})
        self._served = tuple(served)
        #: the handlers of each served version, in definition order
        self._handlers = {v: [h for h in handlers if h.serves(v)] for v in served}
        self._plans: dict[int, _Plan] = {}
        for version in registry.versions(message_type):
            self._plans[version] = self._plan(version)

    def _plan(self, version: int) -> _Plan:
        if version in self._handlers:
            return _Plan(True, ())
        known = self._registry.get(self.message_type, version) is not None
        older = tuple(
            (v, downcast_chain(self.message_type, version, v) if known else None)
            for v in reversed(self._served)
            if v < version
        )
        return _Plan(False, older)

    def handlers(self, envelope: Envelope) -> list[HandlerSpec]:
        """The handlers of a message ``read`` returned (by the version it was read as)."""
        return self._handlers[type(envelope.payload).__message_version__]

    def read(self, delivery: Delivery) -> Envelope | DecodeError:
        """Decode ``delivery`` as a version this group serves, or say why it cannot be."""
        try:
            envelope = decode(delivery, self._registry)
        except DecodeError as exc:
            if exc.reason != "unknown-version" or exc.message_type != self.message_type:
                return exc
            if exc.version is None:  # always set with unknown-version
                return exc
            return self._read_older(delivery, None, exc.version)
        if envelope.message_type != self.message_type:
            return envelope  # not this subscription's type: the caller refuses it
        if envelope.version in self._handlers:
            return envelope
        return self._read_older(delivery, envelope, envelope.version)

    def _read_older(
        self, delivery: Delivery, envelope: Envelope | None, version: int
    ) -> Envelope | DecodeError:
        plan = self._plans.get(version)
        if plan is None:
            plan = self._plan(version)
            if len(self._plans) < _MAX_PLANS:
                self._plans[version] = plan
        tried: list[str] = []
        for target, chain in plan.older:
            contract = self._registry.get(self.message_type, target)
            if contract is None:
                continue
            if chain is not None and envelope is not None:
                try:
                    payload: Any = envelope.payload
                    for step in chain:
                        payload = step(payload)
                    if not isinstance(payload, contract):
                        raise TypeError(f"returned {type(payload).__name__}")
                except Exception as exc:
                    tried.append(f"v{target} by downcaster: {type(exc).__name__}: {exc}")
                    continue
                return replace(envelope, payload=payload)
            try:
                return decode(
                    delivery, _ReadAs(self._registry, self.message_type, version, contract)
                )
            except DecodeError as exc:
                cause = exc.cause
                why = _first_error(cause) if isinstance(cause, ValidationError) else str(exc)
                tried.append(f"v{target} by validation: {why}")
        attempts = "; ".join(tried) if tried else "no older version is served to read it as"
        return DecodeError(
            "unknown-version",
            f"{self.message_type} version {version} is served by no handler of group "
            f"{self._group!r} (served versions: {list(self._served)}); tried: {attempts}",
            message_type=self.message_type,
            version=version,
        )


def pinned_versions(
    pins: Mapping[type[Message] | str, int], contracts: ContractRegistry
) -> dict[str, type[Message]]:
    """``MessageBus(publish_versions=...)`` checked: message type → the contract to emit.

    Keys are contract classes (any version of the type) or message type names;
    a version that is not registered is refused here, when the bus is built.
    """
    pinned: dict[str, type[Message]] = {}
    for key, version in pins.items():
        message_type = key if isinstance(key, str) else getattr(key, "__message_type__", None)
        if not isinstance(message_type, str):
            raise ConfigurationError(
                f"publish_versions keys are contract classes or message type names, got {key!r}"
            )
        contract = contracts.get(message_type, version)
        if contract is None:
            known = sorted(contracts.versions(message_type))
            raise ConfigurationError(
                f"publish_versions pins {message_type} to version {version}, which is not "
                f"registered (registered versions: {known or 'none'})"
            )
        pinned[message_type] = contract
    return pinned
