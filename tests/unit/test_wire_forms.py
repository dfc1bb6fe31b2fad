"""Payload values in the platform's forms: decimals as exact JSON numbers, datetimes in
UTC with milliseconds and Z, the same in the envelope and in model_dump_json."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from banyan_bus import Event
from banyan_bus.envelope import encode


class LedgerPosted(Event, version=7_001):
    amount: Decimal
    fees: list[Decimal] = []
    rates: dict[str, Decimal] = {}
    posted_at: datetime
    settled_at: datetime | None = None


def _event() -> LedgerPosted:
    return LedgerPosted(
        amount=Decimal("99.990"),
        fees=[Decimal("0.10"), Decimal("-1E+3")],
        rates={"eur": Decimal("1.0842")},
        posted_at=datetime(2025, 11, 15, 10, 30, 0, 123456, tzinfo=UTC),
        settled_at=datetime(2025, 11, 15, 12, 30, 0, 999999, tzinfo=timezone(timedelta(hours=2))),
    )


def test_the_envelope_payload_has_decimals_as_numbers_with_their_digits() -> None:
    body = encode(_event(), service_name="ledger").body
    assert b'"amount":99.990' in body
    assert b'"fees":[0.10,-1E+3]' in body
    assert b'"rates":{"eur":1.0842}' in body
    payload = json.loads(body)["payload"]
    assert payload["amount"] == 99.99  # a JavaScript reader gets a number
    assert json.loads(body, parse_float=Decimal)["payload"]["amount"] == Decimal("99.990")


def test_datetimes_are_utc_milliseconds_with_z() -> None:
    payload = json.loads(encode(_event(), service_name="ledger").body)["payload"]
    assert payload["postedAt"] == "2025-11-15T10:30:00.123Z"
    assert payload["settledAt"] == "2025-11-15T10:30:00.999Z"  # converted to UTC


def test_a_naive_datetime_is_taken_as_utc() -> None:
    naive = _event().model_copy(update={"posted_at": datetime(2025, 1, 2, 3, 4, 5, 678000)})
    assert '"postedAt":"2025-01-02T03:04:05.678Z"' in naive.model_dump_json(by_alias=True)


def test_the_mark_never_reaches_the_user() -> None:
    event = _event()
    text = event.model_dump_json(by_alias=True)
    assert "banyan-decimal" not in text
    assert '"amount":99.990' in text
    dumped = event.model_dump(mode="json")
    assert dumped["amount"] == "99.990"
    assert dumped["fees"] == ["0.10", "-1E+3"]
    assert dumped["rates"] == {"eur": "1.0842"}
    assert event.model_dump()["amount"] == Decimal("99.990")


def test_round_trip() -> None:
    event = _event()
    again = LedgerPosted.model_validate_json(event.model_dump_json())
    assert again.amount == event.amount
    assert again.fees == event.fees
    assert again.posted_at == event.posted_at.replace(microsecond=123000)
