"""Class handlers: injection and scopes, startup validation, version dispatch, CQRS.
Runs on memory:// and amqp://."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from dishka import Provider, Scope, provide
from pydantic import BaseModel

from banyan_bus import (
    Command,
    CommandHandler,
    DependencyError,
    Event,
    EventHandler,
    HandlerError,
    Logger,
    MessageBus,
    MessageContext,
    Query,
    QueryHandler,
    RemoteHandlerError,
    RequestTimeout,
    RetryPolicy,
    upcaster,
)
from tests.support import duplicates, wait_until


class InvoiceBooked(Event):
    invoice_id: str
    fail: bool = False


class InvoiceBookedV2(Event, name="InvoiceBooked", version=2):
    invoice_id: str
    currency: str = "EUR"


class InvoiceBookedV3(Event, name="InvoiceBooked", version=3):
    """Not additive (invoice_id renamed): no handler serves it, none can read it as v2."""

    invoice_ref: str
    currency: str
    lines: int


class AccountView(BaseModel):
    account_id: str
    owner: str


class OpenAccount(Command, result=AccountView):
    owner: str
    fail: bool = False
    slow: float = 0.0


class CountAccounts(Query, result=int):
    pass


class Ledger:
    """An app-scoped service: one instance for the bus's lifetime."""

    def __init__(self) -> None:
        self.entries: list[str] = []


class Session:
    """A per-message resource that must be closed after each message."""

    ids = itertools.count()

    def __init__(self) -> None:
        self.id = next(self.ids)
        self.closed = False


class Tracking:
    def __init__(self) -> None:
        self.sessions: list[Session] = []


def services(tracking: Tracking) -> Provider:
    provider = Provider()
    provider.provide(Ledger, scope=Scope.APP)

    class Sessions(Provider):
        @provide(scope=Scope.REQUEST)
        async def session(self) -> AsyncIterator[Session]:
            session = Session()
            tracking.sessions.append(session)
            try:
                yield session
            finally:
                session.closed = True

    return Sessions(), provider  # type: ignore[return-value]


@EventHandler(InvoiceBooked, retry=RetryPolicy.none())
class BookInvoice:
    seen: list[tuple[str, int, int, str]] = []

    def __init__(
        self, ledger: Ledger, session: Session, ctx: MessageContext, log: Logger, bus: MessageBus
    ) -> None:
        self.ledger = ledger
        self.session = session
        self.ctx = ctx
        self.log = log
        assert isinstance(bus, MessageBus)

    async def handle(self, event: InvoiceBooked) -> None:
        self.log.info("booking", invoice=event.invoice_id)
        self.seen.append((event.invoice_id, id(self.ledger), self.session.id, self.ctx.id))
        self.ledger.entries.append(event.invoice_id)
        if event.fail:
            raise RuntimeError("ledger is read-only")


async def test_singleton_and_per_message_dependencies(bus_url: str, unique) -> None:
    tracking = Tracking()
    BookInvoice.seen = []
    bus = MessageBus(unique("billing"), bus_url, providers=[*services(tracking)])
    await bus.register(BookInvoice)
    async with bus:
        for i in range(5):
            await bus.publish(InvoiceBooked(invoice_id=f"inv{i}", fail=(i == 2)))
        await wait_until(lambda: len(BookInvoice.seen) == 5)
        await wait_until(lambda: all(s.closed for s in tracking.sessions))
    ledgers = {ledger for _, ledger, _, _ in BookInvoice.seen}
    sessions = [session for _, _, session, _ in BookInvoice.seen]
    assert len(ledgers) == 1, "the APP-scoped Ledger is one object"
    assert len(set(sessions)) == 5, "each message gets its own Session"
    assert len(tracking.sessions) == 5
    assert all(s.closed for s in tracking.sessions), "closed after each message, also on failure"
    assert len({ctx_id for *_, ctx_id in BookInvoice.seen}) == 5


class Unregistered:
    pass


@EventHandler(InvoiceBooked)
class NeedsSomethingMissing:
    def __init__(self, ledger: Ledger, missing: Unregistered) -> None:
        self.ledger = ledger

    async def handle(self, event: InvoiceBooked) -> None:  # pragma: no cover - never built
        pass


async def test_missing_dependency_fails_at_start(bus_url: str, unique) -> None:
    bus = MessageBus(unique("billing"), bus_url, providers=[*services(Tracking())])
    await bus.register(NeedsSomethingMissing)
    with pytest.raises(DependencyError) as info:
        await bus.start()
    text = str(info.value)
    assert "NeedsSomethingMissing" in text
    assert "'missing'" in text
    assert "Unregistered" in text
    assert not bus.started


def test_handle_annotation_must_match_the_contract() -> None:
    with pytest.raises(HandlerError, match="annotated with InvoiceBookedV2"):

        @EventHandler(InvoiceBooked)
        class Wrong:
            async def handle(self, event: InvoiceBookedV2) -> None:
                pass


def test_decorator_refuses_a_command_for_an_event_handler() -> None:
    with pytest.raises(HandlerError, match="concrete Event"):
        EventHandler(OpenAccount)


@EventHandler(InvoiceBooked)
class VersionedInvoices:
    calls: list[tuple[str, str]] = []

    async def handle_v1(self, event: InvoiceBooked) -> None:
        self.calls.append(("v1", event.invoice_id))

    async def handle_v2(self, event: InvoiceBookedV2, ctx: MessageContext) -> None:
        assert ctx.version == 2
        self.calls.append(("v2", f"{event.invoice_id}/{event.currency}"))


@upcaster(InvoiceBooked, InvoiceBookedV2)
def invoice_v1_to_v2(old: InvoiceBooked) -> InvoiceBookedV2:
    return InvoiceBookedV2(invoice_id=old.invoice_id, currency="EUR")


@EventHandler(InvoiceBookedV2)
class UpcastInvoices:
    calls: list[InvoiceBookedV2] = []

    async def handle(self, event: InvoiceBookedV2) -> None:
        self.calls.append(event)


async def test_version_dispatch_upcasting_and_unknown_version(bus_url: str, unique) -> None:
    VersionedInvoices.calls = []
    UpcastInvoices.calls = []
    versioned = MessageBus(unique("versioned"), bus_url, retry=RetryPolicy.none())
    await versioned.register(VersionedInvoices)
    upcasting = MessageBus(unique("upcasting"), bus_url, retry=RetryPolicy.none())
    await upcasting.register(UpcastInvoices)
    async with versioned, upcasting:
        await versioned.publish(InvoiceBooked(invoice_id="a"))
        await versioned.publish(InvoiceBookedV2(invoice_id="b", currency="USD"))
        await versioned.publish(InvoiceBookedV3(invoice_ref="c", currency="GBP", lines=2))
        await wait_until(
            lambda: len(VersionedInvoices.calls) == 2 and len(UpcastInvoices.calls) == 2
        )
        for bus in (versioned, upcasting):
            [sub] = bus.subscriptions
            for _ in range(200):
                state = await bus.transport.queue_state(sub.dlq_name)
                if state is not None and state.messages == 1:
                    break
                await asyncio.sleep(0.02)
            dead = await bus.transport.get(sub.dlq_name)
            assert dead is not None
            assert dead.headers["x-banyan-reason"] == "unknown-version"
            assert dead.headers["x-version"] == 3
            await dead.ack()
    assert sorted(VersionedInvoices.calls) == [("v1", "a"), ("v2", "b/USD")]
    assert sorted(e.invoice_id + e.currency for e in UpcastInvoices.calls) == ["aEUR", "bUSD"]


@CommandHandler(OpenAccount)
class OpenAccountHandler:
    opened: list[str] = []

    def __init__(self, ledger: Ledger, bus: MessageBus) -> None:
        self.ledger = ledger
        self.bus = bus

    async def handle(self, command: OpenAccount, ctx: MessageContext) -> AccountView:
        if command.fail:
            raise ValueError(f"owner {command.owner!r} is blocked")
        await asyncio.sleep(command.slow)
        self.opened.append(f"{command.owner}@{self.bus.service}")
        self.ledger.entries.append(command.owner)
        return AccountView(account_id=f"acc_{command.owner}", owner=command.owner)


@QueryHandler(CountAccounts)
class CountAccountsHandler:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def handle(self, query: CountAccounts) -> int:
        return len(self.ledger.entries)


async def test_send_and_query_across_two_services(bus_url: str, unique) -> None:
    OpenAccountHandler.opened = []
    owner = MessageBus(unique("accounts"), bus_url, providers=[*services(Tracking())])
    await owner.register(OpenAccountHandler, CountAccountsHandler)
    caller = MessageBus(unique("web"), bus_url)
    async with owner, caller:
        view = await caller.send(OpenAccount(owner="ada"), timeout=10)
        assert view == AccountView(account_id="acc_ada", owner="ada")
        assert await caller.query(CountAccounts(), timeout=10) == 1
        with pytest.raises(RemoteHandlerError) as info:
            await caller.send(OpenAccount(owner="eve", fail=True), timeout=10)
        assert info.value.error_type == "ValueError"
        assert "blocked" in info.value.error_message
        with pytest.raises(RequestTimeout):
            await caller.send(OpenAccount(owner="slow", slow=3.0), timeout=0.5)


class CloseAccount(Command):
    account_id: str


async def test_command_nobody_owns_times_out_quickly(bus_url: str, unique) -> None:
    async with MessageBus(unique("web"), bus_url) as caller:
        with pytest.raises(RequestTimeout, match="no service handles CloseAccount"):
            await caller.send(CloseAccount(account_id="x"), timeout=5)


async def test_owner_instances_share_commands(bus_url: str, unique) -> None:
    OpenAccountHandler.opened = []
    service = unique("accounts")
    owners = [MessageBus(service, bus_url, providers=[*services(Tracking())]) for _ in range(3)]
    for owner in owners:
        await owner.register(OpenAccountHandler)
    caller = MessageBus(unique("web"), bus_url)
    async with owners[0], owners[1], owners[2], caller:
        results = await asyncio.gather(
            *(caller.send(OpenAccount(owner=f"u{i}"), timeout=30) for i in range(300))
        )
    assert sorted(r.owner for r in results) == sorted(f"u{i}" for i in range(300))
    names = [o.split("@")[0] for o in OpenAccountHandler.opened]
    assert duplicates(names) == {}
    assert len(names) == 300


async def test_register_a_module_and_refuse_plain_classes(unique, memory_url: str) -> None:
    import sys

    bus = MessageBus(unique("svc"), memory_url, providers=[*services(Tracking())])
    with pytest.raises(HandlerError, match="not a handler class"):
        await bus.register(Ledger)
    await bus.register(sys.modules[__name__])
    registered = {
        spec.name.rsplit(".", 1)[-1] for sub in bus.subscriptions for spec in sub.handlers
    }
    assert {"BookInvoice", "VersionedInvoices"} <= registered
