"""The platform's naming rule, applied where a contract is defined: events are facts
({Noun}{PastTenseVerb}, phrasal verbs too), commands and queries are not, every message
type is PascalCase, and a contract can opt out explicitly."""

from __future__ import annotations

import types

import pytest

from banyan_bus import Command, Event, Query
from banyan_bus.contracts import reads_as_fact, registry
from banyan_bus.errors import ContractError


@pytest.fixture(autouse=True)
def _forget_contracts():  # type: ignore[no-untyped-def]
    before = dict(registry._by_key)
    by_type = {t: dict(versions) for t, versions in registry._by_type.items()}
    yield
    registry._by_key.clear()
    registry._by_key.update(before)
    registry._by_type.clear()
    registry._by_type.update(by_type)


def _define(name: str, base: type) -> type:
    # A version no other test module uses, so these names never clash in the registry.
    def body(ns: dict[str, object]) -> None:
        ns["__annotations__"] = {"x": int}
        ns["__module__"] = __name__

    return types.new_class(name, (base,), {"version": 9_999}, body)


@pytest.mark.parametrize(
    "name",
    [
        "UserCreated",
        "PaymentProcessed",
        "EmailSent",
        "OrderPaid",
        "UserLoggedIn",
        "UserSignedUp",
        "CartCheckedOut",
        "AccountSetUp",
        "InvoiceWrittenOff",
        "HTTPRequestReceived",
    ],
)
def test_facts_are_accepted_as_events(name: str) -> None:
    assert reads_as_fact(name)
    _define(name, Event)


@pytest.mark.parametrize("name", ["CreateUser", "UserCreate", "LogIn", "SignUp", "Heartbeat"])
def test_instructions_and_nouns_are_refused_as_events(name: str) -> None:
    with pytest.raises(ContractError, match="does not read as a fact") as caught:
        _define(name, Event)
    message = str(caught.value)
    assert "'UserLoggedIn'" in message  # says what would be accepted
    assert 'naming="free"' in message  # and how to opt out


@pytest.mark.parametrize("name", ["user_created", "userCreated", "User_Created"])
def test_message_types_are_pascal_case(name: str) -> None:
    with pytest.raises(ContractError, match="not PascalCase"):
        _define(name, Event)


def test_a_command_named_like_an_event_is_refused() -> None:
    with pytest.raises(ContractError, match="reads as a fact"):
        _define("UserCreated", Command)
    with pytest.raises(ContractError, match="reads as a fact"):
        _define("OrdersShipped", Query)
    _define("CreateUser", Command)
    _define("GetUser", Query)


def test_opting_out_is_explicit() -> None:
    class InventoryLow(Event, naming="free"):
        """A state crossed a threshold; the platform names such signals by the state."""

        sku: str

    class Heartbeat(Event, check_name=False):  # the older spelling still works
        at: int

    assert InventoryLow.__message_type__ == "InventoryLow"
    with pytest.raises(ContractError, match="naming must be 'strict'"):

        class ParcelMislaid(Event, naming="loose"):  # type: ignore[call-arg]
            x: int
