"""Tests for banyan_bus.delay: the ``after=`` parser and the delay topology.

The topology is checked by simulation: a tiny AMQP topic matcher walks a
message through the described exchanges, bindings and TTL queues, so a wrong
binding key shows up here rather than as a message delivered at the wrong
time (or never) on a real broker.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banyan_bus.delay import (
    DELIVERY_EXCHANGE,
    EPOCH_MS_THRESHOLD,
    MAX_DELAY,
    MAX_DELAY_MS,
    MAX_LEVEL,
    MAX_ROUTABLE_DELAY_S,
    BindingDecl,
    DelayTopology,
    QueueDecl,
    delay_route,
    delay_seconds,
    delay_topology,
    destination_binding_key,
    first_level,
    level_name,
    parse_after,
    parse_routing_key,
    routing_key,
)

NOW = datetime(2022, 1, 14, 17, 46, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
SECOND = 1_000
DAY = 86_400_000

# --------------------------------------------------------------------------
# A tiny AMQP 0-9-1 topic matcher: '*' is exactly one word, '#' zero or more.
# --------------------------------------------------------------------------


def topic_matches(pattern: str, key: str) -> bool:
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        head, rest = p[0], p[1:]
        if head == "#":
            return any(match(rest, k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (head == "*" or head == k[0]) and match(rest, k[1:])

    return match(pattern.split("."), key.split("."))


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("*.b", "a.b", True),
        ("*.b", "b", False),
        ("#", "a.b.c", True),
        ("#.c", "c", True),
        ("#.c", "a.b.c", True),
        ("#.b.c", "a.x.c", False),
        ("*.*.1.#", "0.0.1", True),
        ("*.*.1.#", "0.0.1.x.y", True),
        ("*.*.1.#", "0.1.1.x.y", True),
        ("*.*.1.#", "0.0.0.x.y", False),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
    ],
)
def test_topic_matcher_itself(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


# --------------------------------------------------------------------------
# Simulation of the topology
# --------------------------------------------------------------------------

DEST = "exchange.platform.events.billing.usercreated"
DEST_QUEUE = "final.queue"
OTHER_DESTS = {
    # A longer name ending in DEST: "#."+DEST would have matched it.
    "dlq." + DEST: "final.dlq",
    # A name that DEST ends in.
    "billing.usercreated": "final.short",
    "exchange.platform.events.shipping.usercreated": "final.other",
}


class Broker:
    """Just enough of RabbitMQ routing to follow a delayed message."""

    def __init__(self, topology: DelayTopology) -> None:
        self.exchanges = {e.name for e in topology.exchanges}
        self.queues: dict[str, QueueDecl] = {q.name: q for q in topology.queues}
        self.bindings: list[BindingDecl] = list(topology.bindings)
        assert len(self.exchanges) == len(topology.exchanges), "duplicate exchange names"
        assert len(self.queues) == len(topology.queues), "duplicate queue names"
        # What the bus declares per destination, plus neighbours that must not
        # receive the message.
        for dest, queue in {DEST: DEST_QUEUE, **OTHER_DESTS}.items():
            self.exchanges.add(dest)
            self.bindings.append(
                BindingDecl(DELIVERY_EXCHANGE, dest, "exchange", destination_binding_key(dest))
            )
            self.bindings.append(BindingDecl(dest, queue, "queue", "#"))
        for b in self.bindings:
            assert b.source in self.exchanges, b
            if b.destination_kind == "exchange":
                assert b.destination in self.exchanges, b

    def route(self, exchange: str, key: str) -> tuple[set[str], set[str]]:
        """(queues reached, exchanges passed) when publishing ``key`` to ``exchange``."""
        queues: set[str] = set()
        seen: set[str] = set()
        todo = [exchange]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            for b in self.bindings:
                if b.source == current and topic_matches(b.routing_key, key):
                    (queues.add if b.destination_kind == "queue" else todo.append)(b.destination)
        return queues, seen

    def deliver(self, exchange: str, key: str) -> tuple[str, float, list[int]]:
        """Follow the message to a non-delay queue: (queue, seconds waited, levels held)."""
        waited = 0.0
        held: list[int] = []
        for _ in range(2 * (MAX_LEVEL + 1) + 2):
            queues, passed = self.route(exchange, key)
            assert len(queues) == 1, f"{key} from {exchange} reached {queues}"
            (queue,) = queues
            spec = self.queues.get(queue)
            if spec is None:
                assert DELIVERY_EXCHANGE in passed
                return queue, waited, held
            ttl = spec.arguments["x-message-ttl"]
            assert isinstance(ttl, int)
            waited += ttl / 1000
            held.append(int(queue.rsplit(".", 1)[1]))
            dead_letter = spec.arguments["x-dead-letter-exchange"]
            assert isinstance(dead_letter, str)
            exchange = dead_letter
        raise AssertionError(f"{key} never left the delay topology")


def boundary_delays() -> list[int]:
    values = {1, 2, 3, 31_622_400, MAX_ROUTABLE_DELAY_S}
    for k in range(1, MAX_LEVEL + 1):
        values |= {2**k - 1, 2**k, 2**k + 1}
    return sorted(v for v in values if 1 <= v <= MAX_ROUTABLE_DELAY_S)


@pytest.fixture(scope="module", params=["quorum", "classic"])
def broker(request: pytest.FixtureRequest) -> Broker:
    return Broker(delay_topology(request.param))


@pytest.mark.parametrize("delay_s", boundary_delays())
def test_simulated_delay_from_first_level(broker: Broker, delay_s: int) -> None:
    key = routing_key(delay_s, DEST)
    queue, waited, held = broker.deliver(level_name(first_level(delay_s)), key)
    assert queue == DEST_QUEUE
    assert waited == delay_s
    assert held == [n for n in range(MAX_LEVEL, -1, -1) if delay_s >> n & 1]


@pytest.mark.parametrize("delay_s", boundary_delays())
def test_simulated_delay_from_top_level(broker: Broker, delay_s: int) -> None:
    # Publishing to level 27 regardless of the delay must give the same result.
    queue, waited, _ = broker.deliver(level_name(MAX_LEVEL), routing_key(delay_s, DEST))
    assert queue == DEST_QUEUE
    assert waited == delay_s


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=MAX_ROUTABLE_DELAY_S))
def test_simulated_delay_any_value(delay_s: int) -> None:
    broker = Broker(delay_topology())
    route = delay_route(delay_s * 1000, DEST)
    queue, waited, _ = broker.deliver(route.exchange, route.routing_key)
    assert (queue, waited) == (DEST_QUEUE, delay_s)


def test_delivery_binding_matches_only_its_destination() -> None:
    key = routing_key(5, DEST)
    assert topic_matches(destination_binding_key(DEST), key)
    for other in OTHER_DESTS:
        assert not topic_matches(destination_binding_key(other), key)
    # Why not NServiceBus's "#.<dest>": it also matches longer names ending in dest.
    assert topic_matches("#." + DEST, routing_key(5, "dlq." + DEST))
    assert not topic_matches(destination_binding_key(DEST), routing_key(5, "dlq." + DEST))


def test_each_level_exchange_tests_its_own_bit(broker: Broker) -> None:
    for level in range(MAX_LEVEL + 1):
        name = level_name(level)
        queues, _ = broker.route(name, routing_key(2**level, DEST))
        assert queues == {name}
        # bit clear, every other bit set: skips this level's queue
        queues, _ = broker.route(name, routing_key(MAX_ROUTABLE_DELAY_S ^ 2**level, DEST))
        expected = {level_name(level - 1)} if level else {DEST_QUEUE}
        assert queues == expected


# --------------------------------------------------------------------------
# Topology description
# --------------------------------------------------------------------------


def test_level_name() -> None:
    assert level_name(7) == "banyan.delay.level.07"
    assert level_name(0) == "banyan.delay.level.00"
    assert level_name(27) == "banyan.delay.level.27"
    for bad in (-1, 28, True, 1.0):
        with pytest.raises(ValueError, match="level"):
            level_name(bad)  # type: ignore[arg-type]


def test_topology_shape_quorum() -> None:
    topo = delay_topology()
    assert topo.queue_type == "quorum"
    assert topo.delivery_exchange == DELIVERY_EXCHANGE == "banyan.delay.delivery"
    names = [level_name(n) for n in range(MAX_LEVEL, -1, -1)]
    assert [e.name for e in topo.exchanges] == [*names, DELIVERY_EXCHANGE]
    assert all(e.type == "topic" and e.durable for e in topo.exchanges)
    assert [q.name for q in topo.queues] == names
    assert len(topo.bindings) == 2 * (MAX_LEVEL + 1)
    for q in topo.queues:
        n = int(q.name[-2:])
        assert q.durable
        assert dict(q.arguments) == {
            "x-queue-type": "quorum",
            "x-message-ttl": 2**n * 1000,
            "x-dead-letter-exchange": level_name(n - 1) if n else DELIVERY_EXCHANGE,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


def test_topology_bindings() -> None:
    by_source: dict[str, list[BindingDecl]] = {}
    for b in delay_topology().bindings:
        by_source.setdefault(b.source, []).append(b)
    for n in range(MAX_LEVEL + 1):
        name = level_name(n)
        skip = "*." * (MAX_LEVEL - n)
        to_queue, to_next = by_source[name]
        assert to_queue == BindingDecl(name, name, "queue", skip + "1.#")
        nxt = level_name(n - 1) if n else DELIVERY_EXCHANGE
        assert to_next == BindingDecl(name, nxt, "exchange", skip + "0.#")
    assert by_source[level_name(27)][0].routing_key == "1.#"
    assert by_source[level_name(0)][0].routing_key == "*." * 27 + "1.#"


def test_topology_classic() -> None:
    topo = delay_topology("classic")
    assert topo.queue_type == "classic"
    q = topo.queues[-1]
    assert dict(q.arguments) == {
        "x-queue-type": "classic",
        "x-message-ttl": 1000,
        "x-dead-letter-exchange": DELIVERY_EXCHANGE,
    }
    assert topo.bindings == delay_topology("quorum").bindings


def test_topology_bad_queue_type() -> None:
    with pytest.raises(ValueError, match="queue_type"):
        delay_topology("stream")  # type: ignore[arg-type]


def test_topology_is_immutable() -> None:
    topo = delay_topology()
    with pytest.raises(dataclasses.FrozenInstanceError):
        topo.queues = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        topo.queues[0].arguments["x-message-ttl"] = 1  # type: ignore[index]
    assert delay_topology() == topo


def test_ttl_of_top_level_is_about_4_years() -> None:
    top = delay_topology().queues[0]
    assert top.arguments["x-message-ttl"] == 134_217_728_000
    assert MAX_ROUTABLE_DELAY_S == 2**28 - 1 == 268_435_455


# --------------------------------------------------------------------------
# Routing keys
# --------------------------------------------------------------------------


def test_routing_key_example() -> None:
    assert routing_key(5, "x.y") == "0." * 25 + "1.0.1.x.y"
    assert routing_key(1, "d") == "0." * 27 + "1.d"
    assert routing_key(MAX_ROUTABLE_DELAY_S, "d") == "1." * 28 + "d"
    assert routing_key(2**27, "d") == "1." + "0." * 27 + "d"


@pytest.mark.parametrize("bad", [0, -1, 2**28, True, 1.0, "5"])
def test_routing_key_bad_delay(bad: Any) -> None:
    with pytest.raises(ValueError, match="delay_s"):
        routing_key(bad, "x")


@pytest.mark.parametrize("bad", ["", "a.#", "a.*", None])
def test_routing_key_bad_destination(bad: Any) -> None:
    with pytest.raises(ValueError, match="destination"):
        routing_key(1, bad)
    with pytest.raises(ValueError, match="destination"):
        destination_binding_key(bad)


def test_routing_key_length_limit() -> None:
    room = 255 - 56
    assert len(routing_key(1, "a" * room).encode()) == 255
    with pytest.raises(ValueError, match="255"):
        routing_key(1, "a" * (room + 1))
    # bytes, not characters
    with pytest.raises(ValueError, match="255"):
        routing_key(1, "é" * 100)


def test_first_level() -> None:
    assert first_level(1) == 0
    assert first_level(2) == 1
    assert first_level(3) == 1
    assert first_level(5) == 2
    assert first_level(2**27) == 27
    assert first_level(MAX_ROUTABLE_DELAY_S) == 27
    with pytest.raises(ValueError, match="delay_s"):
        first_level(0)
    with pytest.raises(ValueError, match="delay_s"):
        first_level(2**28)


@pytest.mark.parametrize("delay_s", boundary_delays())
def test_parse_routing_key_round_trip(delay_s: int) -> None:
    assert parse_routing_key(routing_key(delay_s, "a.b.c")) == (delay_s, "a.b.c")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x",
        "0." * 28,  # no destination
        "0." * 28 + "d",  # zero delay
        "0." * 27 + "2.d",  # not a bit
        "0." * 26 + "1",  # too few bits
        "1.d",
    ],
)
def test_parse_routing_key_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="routing key"):
        parse_routing_key(bad)


def test_destination_binding_key() -> None:
    assert destination_binding_key("x.y") == "*." * 28 + "x.y"


@pytest.mark.parametrize(
    ("delay_ms", "seconds"),
    [
        (0, 1),
        (1, 1),
        (999, 1),
        (1000, 1),
        (1001, 2),
        (1500, 2),
        (60_000, 60),
        (MAX_DELAY_MS, 31_622_400),
    ],
)
def test_delay_seconds(delay_ms: int, seconds: int) -> None:
    assert delay_seconds(delay_ms) == seconds


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1000"])
def test_delay_seconds_refuses(bad: Any) -> None:
    with pytest.raises(ValueError, match="delay_ms"):
        delay_seconds(bad)


def test_delay_route() -> None:
    route = delay_route(5_500, "x")
    assert route.delay_s == 6
    assert route.exchange == level_name(2)
    assert route.routing_key == routing_key(6, "x")
    assert delay_route(1, "x").exchange == level_name(0)


# --------------------------------------------------------------------------
# parse_after
# --------------------------------------------------------------------------


def after(value: Any, now: datetime = NOW) -> int:
    return parse_after(value, now=now)


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (1, 1),
        (1500, 1500),
        (1.5, 2),  # rounded up: never early
        (0.001, 1),
        (MAX_DELAY_MS, MAX_DELAY_MS),
        (float(MAX_DELAY_MS), MAX_DELAY_MS),
    ],
)
def test_numbers_are_milliseconds(value: float, ms: int) -> None:
    assert after(value) == ms


@pytest.mark.parametrize("value", [0, -1, 0.0, -0.5, MAX_DELAY_MS + 1, MAX_DELAY_MS + 0.5])
def test_numbers_out_of_range(value: float) -> None:
    with pytest.raises(ValueError, match="accepted") as err:
        after(value)
    assert repr(value) in str(err.value)


def test_epoch_threshold_rule() -> None:
    assert EPOCH_MS_THRESHOLD == 10**12
    # 12 digits: a duration (~31.7 years): refused as too long, not read as a time
    with pytest.raises(ValueError, match="366 days"):
        after(EPOCH_MS_THRESHOLD - 1)
    # 13 digits: a point in time (2001-09-09), in the past here
    with pytest.raises(ValueError, match="past"):
        after(EPOCH_MS_THRESHOLD)


def test_epoch_timestamps() -> None:
    assert after(NOW_MS + 5_000) == 5_000
    assert after(NOW_MS + 1) == 1
    assert after(float(NOW_MS) + 2_500.5) == 2_501  # time.time() * 1000 style
    assert after(NOW_MS + MAX_DELAY_MS) == MAX_DELAY_MS
    for bad in (NOW_MS, NOW_MS - 1, NOW_MS + MAX_DELAY_MS + 1):
        with pytest.raises(ValueError, match=str(bad)):
            after(bad)


def test_iso_example() -> None:
    assert after("2022-01-14T17:46:05.811Z") == 5_811


@pytest.mark.parametrize(
    "value",
    [
        "2022-01-14T17:46:05.811Z",
        "2022-01-14T17:46:05.811+00:00",
        "2022-01-14T18:46:05.811+01:00",
        "2022-01-14T12:46:05.811-05:00",
        "  2022-01-14t17:46:05.811z ",
    ],
)
def test_iso_with_offsets(value: str) -> None:
    assert after(value) == 5_811


@pytest.mark.parametrize("value", ["2022-01-14T17:46:05.811", "2022-01-15", "2022-01-15T00:00"])
def test_iso_naive_refused(value: str) -> None:
    with pytest.raises(ValueError, match="no UTC offset"):
        after(value)


def test_iso_past_and_too_far() -> None:
    with pytest.raises(ValueError, match="past"):
        after("2022-01-14T17:46:00Z")
    with pytest.raises(ValueError, match="past"):
        after("2021-01-14T17:46:00Z")
    assert after("2023-01-15T17:46:00Z") == MAX_DELAY_MS  # 366 days: ok
    with pytest.raises(ValueError, match="366 days"):
        after("2023-01-15T17:46:00.001Z")


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("1 second", SECOND),
        ("2 seconds", 2 * SECOND),
        ("5 s", 5 * SECOND),
        ("5s", 5 * SECOND),
        ("5 sec", 5 * SECOND),
        ("5 secs", 5 * SECOND),
        ("1 minute", 60 * SECOND),
        ("3 minutes", 180 * SECOND),
        ("3 min", 180 * SECOND),
        ("3 mins", 180 * SECOND),
        ("1 hour", 3_600 * SECOND),
        ("2 hours", 7_200 * SECOND),
        ("2 h", 7_200 * SECOND),
        ("2 hr", 7_200 * SECOND),
        ("2 hrs", 7_200 * SECOND),
        ("1 day", DAY),
        ("2 days", 2 * DAY),
        ("2 d", 2 * DAY),
        ("1 week", 7 * DAY),
        ("2 weeks", 14 * DAY),
        ("2 w", 14 * DAY),
        ("2 wk", 14 * DAY),
        ("2 wks", 14 * DAY),
        ("1.5 hours", 5_400 * SECOND),
        ("0.1 seconds", 100),
        (".5 s", 500),
        ("0.0001 s", 1),  # rounded up to 1 ms
        ("1.5 weeks", 10 * DAY + 12 * 3_600_000),
        ("366 days", MAX_DELAY_MS),
        ("52 weeks", 364 * DAY),
        ("  5   Minutes  ", 300 * SECOND),
        ("5MIN", 300 * SECOND),
        ("1 Day", DAY),
        ("\t2 HOURS\n", 7_200 * SECOND),
    ],
)
def test_amounts(value: str, ms: int) -> None:
    assert after(value) == ms


@pytest.mark.parametrize(
    ("now", "value", "days"),
    [
        (datetime(2024, 1, 31, 12, tzinfo=UTC), "1 month", 29),  # leap Feb: clamp to 29
        (datetime(2023, 1, 31, 12, tzinfo=UTC), "1 month", 28),  # clamp to 28
        (datetime(2023, 3, 31, 12, tzinfo=UTC), "1 month", 30),  # Apr 30
        (datetime(2023, 1, 15, 12, tzinfo=UTC), "1 month", 31),
        (datetime(2023, 12, 15, 12, tzinfo=UTC), "1 months", 31),  # over the year end
        (datetime(2023, 8, 31, 12, tzinfo=UTC), "6 months", 182),  # Feb 29 2024
        (datetime(2023, 1, 31, 12, tzinfo=UTC), "2 months", 59),  # Mar 31 (no drift)
        (datetime(2023, 1, 1, tzinfo=UTC), "1 year", 365),
        (datetime(2023, 3, 1, tzinfo=UTC), "1 year", 366),  # spans Feb 29 2024
        (datetime(2024, 2, 29, tzinfo=UTC), "1 year", 365),  # Feb 28 2025
        (datetime(2024, 2, 29, tzinfo=UTC), "1 yr", 365),
        (datetime(2024, 1, 1, tzinfo=UTC), "1 y", 366),
        (datetime(2023, 3, 1, tzinfo=UTC), "12 months", 366),
        (datetime(2023, 3, 1, tzinfo=UTC), "1 YEARS", 366),
    ],
)
def test_calendar_months_and_years(now: datetime, value: str, days: int) -> None:
    assert after(value, now) == days * DAY


def test_months_use_utc_calendar() -> None:
    # 23:30 on Jan 31 at -05:00 is already Feb 1 in UTC: +1 month = Mar 1 UTC.
    local = datetime(2023, 1, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert after("1 month", local) == 28 * DAY


def test_months_keep_time_of_day() -> None:
    now = datetime(2023, 1, 31, 12, 34, 56, 789_000, tzinfo=UTC)
    assert after("1 month", now) == 28 * DAY


@pytest.mark.parametrize(
    "value",
    [
        "0 seconds",
        "0 months",
        "0.0 s",
        "367 days",
        "52.5 weeks",
        "53 weeks",
        "13 months",
        "2 years",
        "100000 years",
        "1.5 months",
        "0.5 years",
        "3 fortnights",
        "5 m",
        "5 ms",
        "five minutes",
        "-5 minutes",
        "+5 minutes",
        "5",
        "",
        "   ",
        "5 minutes ago",
        "in 5 minutes",
        "1e3 seconds",
        "1,5 hours",
        "garbage",
    ],
)
def test_strings_refused(value: str) -> None:
    with pytest.raises(ValueError, match="accepted") as err:
        after(value)
    assert repr(value) in str(err.value)


def test_m_is_ambiguous_hint() -> None:
    with pytest.raises(ValueError, match="ambiguous"):
        after("5 m")


def test_fractional_months_message() -> None:
    with pytest.raises(ValueError, match="whole number"):
        after("1.5 months")


def test_refusal_lists_accepted_forms() -> None:
    with pytest.raises(ValueError, match="fortnights") as err:
        after("3 fortnights")
    message = str(err.value)
    for fragment in ("'3 fortnights'", "milliseconds", "ISO-8601", "seconds|minutes", "366 days"):
        assert fragment in message


def test_timedelta() -> None:
    assert after(timedelta(seconds=1)) == 1_000
    assert after(timedelta(microseconds=1)) == 1
    assert after(timedelta(milliseconds=1, microseconds=1)) == 2
    assert after(MAX_DELAY) == MAX_DELAY_MS
    assert MAX_DELAY == timedelta(days=366)
    for bad in (timedelta(0), timedelta(seconds=-1), MAX_DELAY + timedelta(microseconds=1)):
        with pytest.raises(ValueError, match="accepted"):
            after(bad)


def test_one_year_boundary() -> None:
    assert after(MAX_DELAY_MS) == MAX_DELAY_MS
    assert after(MAX_DELAY) == MAX_DELAY_MS
    with pytest.raises(ValueError, match="366 days"):
        after(MAX_DELAY_MS + 1)
    with pytest.raises(ValueError, match="366 days"):
        after(MAX_DELAY + timedelta(milliseconds=1))
    with pytest.raises(ValueError, match="366 days"):
        after(NOW + MAX_DELAY + timedelta(milliseconds=1))


def test_datetimes() -> None:
    assert after(NOW + timedelta(seconds=3)) == 3_000
    other_zone = (NOW + timedelta(seconds=3)).astimezone(timezone(timedelta(hours=9)))
    assert after(other_zone) == 3_000
    assert after(NOW + MAX_DELAY) == MAX_DELAY_MS
    with pytest.raises(ValueError, match="naive"):
        after(datetime(2022, 1, 15))
    with pytest.raises(ValueError, match="past"):
        after(NOW)
    with pytest.raises(ValueError, match="past"):
        after(NOW - timedelta(seconds=1))


@pytest.mark.parametrize(
    "value", [True, False, None, [1], Decimal(5), float("nan"), float("inf"), b"5 s"]
)
def test_other_types_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="accepted"):
        after(value)


def test_naive_now_refused() -> None:
    with pytest.raises(ValueError, match="now"):
        parse_after(1000, now=datetime(2022, 1, 14))


def test_default_now_is_the_clock() -> None:
    assert parse_after("1 s") == 1_000
    ms = parse_after(datetime.now(UTC) + timedelta(seconds=10))
    assert 9_000 <= ms <= 10_000
    ms = parse_after(int(datetime.now(UTC).timestamp() * 1000) + 60_000)
    assert 59_000 <= ms <= 60_000
