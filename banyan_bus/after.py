"""What ``after=`` means: every form a user may write, turned into one number of milliseconds.

:func:`parse_after` turns ``1500``, ``"2 hours"``, ``"2022-01-14T17:46:05.811Z"``, a
``timedelta`` ... into the delay in milliseconds, and refuses everything ambiguous or out
of range with a message that lists what is accepted. Keeping this in one place means
``publish(after=...)``, retry policies and the CLI accept exactly the same forms. The
broker side of a delay (the levels that wait for it) is ``delay.py``.
"""

from __future__ import annotations

import calendar
import math
import re
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import NoReturn

__all__ = ["EPOCH_MS_THRESHOLD", "MAX_DELAY", "MAX_DELAY_MS", "parse_after"]


EPOCH_MS_THRESHOLD = 10**12
"""A number this large is a point in time (epoch milliseconds), not a duration.

Rule: **an int of 13 digits or more is a point in time, not a duration.**
10**12 ms after the epoch is 2001-09-09T01:46:40Z, so every current timestamp
(``int(time.time() * 1000)``) is above it, while a *duration* that large
(≈ 31.7 years) could never be valid anyway (see :data:`MAX_DELAY`). The two
readings therefore never compete. The same rule applies to floats, so
``time.time() * 1000 + 5000`` works as well.
"""

MAX_DELAY = timedelta(days=366)
"""The longest accepted delay: 366 days.

Why 366 days rather than "now + 1 calendar year": a fixed limit does not
depend on the clock, so a duration (``1500``, ``timedelta``) is valid or not
regardless of when it is published, and ``"1 year"`` / ``"12 months"`` —
365 or 366 days depending on leap years — are always accepted. The delay
topology could hold ~8.5 years; the limit exists to catch unit mistakes
(seconds passed as milliseconds, a year typed for a month) before they park a
message out of sight for a decade.
"""

MAX_DELAY_MS = 366 * 24 * 60 * 60 * 1000
""":data:`MAX_DELAY` in milliseconds (31 622 400 000)."""

_MS_PER_UNIT: dict[str, int] = {
    "seconds": 1_000,
    "minutes": 60_000,
    "hours": 3_600_000,
    "days": 86_400_000,
    "weeks": 604_800_000,
}

# Short forms are accepted only where nobody could read them two ways. Plain
# "m" is refused on purpose: minutes to some, months to others.
_UNIT_ALIASES: dict[str, str] = {
    **{a: "seconds" for a in ("s", "sec", "secs", "second", "seconds")},
    **{a: "minutes" for a in ("min", "mins", "minute", "minutes")},
    **{a: "hours" for a in ("h", "hr", "hrs", "hour", "hours")},
    **{a: "days" for a in ("d", "day", "days")},
    **{a: "weeks" for a in ("w", "wk", "wks", "week", "weeks")},
    **{a: "months" for a in ("month", "months")},
    **{a: "years" for a in ("y", "yr", "yrs", "year", "years")},
}

_AMOUNT_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[A-Za-z]+)\s*$")

_ACCEPTED = (
    "accepted: a positive number of milliseconds (1500); an epoch-milliseconds "
    "timestamp, i.e. a number >= 10**12 (1642182365811); an ISO-8601 time with an "
    "offset ('2022-01-14T17:46:05.811Z'); '<number> <unit>' with unit "
    "seconds|minutes|hours|days|weeks (decimals allowed) or months|years (whole "
    "numbers), singular or plural, or s|sec|secs|min|mins|h|hr|hrs|d|w|wk|wks|y|yr|yrs; "
    "a positive timedelta; a timezone-aware datetime. The delay must be > 0 and at "
    "most 366 days."
)


def _refuse(value: object, problem: str) -> NoReturn:
    raise ValueError(f"invalid delay after={value!r}: {problem}; {_ACCEPTED}")


def _ceil_ms_from_us(us: int) -> int:
    # Rounding up, never down: a delayed message may arrive a little late but
    # never before the moment the caller asked for.
    return -(-us // 1000)


def _checked(value: object, ms: int | Fraction | float) -> int:
    if ms <= 0:
        _refuse(value, "the delay is zero or in the past")
    if ms > MAX_DELAY_MS:
        _refuse(value, "the delay is more than 366 days ahead")
    return math.ceil(ms)


def _from_timedelta(value: object, delta: timedelta) -> int:
    us = delta // timedelta(microseconds=1)
    if us <= 0:
        _refuse(value, "the delay is zero or in the past")
    return _checked(value, _ceil_ms_from_us(us))


def _add_months(moment: datetime, months: int) -> datetime:
    # Calendar months, clamped to the month's end: Jan 31 + 1 month is Feb 28
    # (or 29), not Mar 3 — what people mean by "in a month".
    years, month_index = divmod(moment.month - 1 + months, 12)
    year = moment.year + years
    month = month_index + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _parse_amount(value: str, now: datetime) -> int | None:
    match = _AMOUNT_RE.match(value)
    if match is None:
        return None
    number, unit_text = match["number"], match["unit"].lower()
    unit = _UNIT_ALIASES.get(unit_text)
    if unit is None:
        hint = " ('m' is ambiguous: write 'min' or 'month')" if unit_text == "m" else ""
        _refuse(value, f"unknown unit {match['unit']!r}{hint}")
    if unit in {"months", "years"}:
        if not number.isdigit():
            _refuse(value, f"{unit} take a whole number (calendar arithmetic)")
        months = int(number) * (12 if unit == "years" else 1)
        if months == 0:
            _refuse(value, "the delay is zero or in the past")
        if months > 12:
            # 13 calendar months are at least 393 days: over the limit without
            # computing a date (which could overflow year 9999).
            _refuse(value, "the delay is more than 366 days ahead")
        utc_now = now.astimezone(UTC)
        return _from_timedelta(value, _add_months(utc_now, months) - utc_now)
    # Fraction keeps "0.1 seconds" exactly 100 ms (a float would give 100.00000000000001
    # and round up to 101).
    return _checked(value, Fraction(number) * _MS_PER_UNIT[unit])


def _parse_string(value: str, now: datetime) -> int:
    amount = _parse_amount(value, now)
    if amount is not None:
        return amount
    text = value.strip().upper()  # 't'/'z' are ISO-8601 too; nothing else is case-sensitive
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        _refuse(value, "not a duration or an ISO-8601 time")
    if moment.tzinfo is None or moment.utcoffset() is None:
        _refuse(value, "the time has no UTC offset, so it is ambiguous (add 'Z' or '+00:00')")
    return _from_timedelta(value, moment - now)


def _epoch_ms(moment: datetime) -> Fraction:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return Fraction((moment - epoch) // timedelta(microseconds=1), 1000)


def parse_after(
    after: int | float | str | datetime | timedelta,
    *,
    now: datetime | None = None,
) -> int:
    """Return the delay ``after`` asks for, in whole milliseconds (> 0).

    Forms (anything else raises :class:`ValueError` naming the value and
    listing these):

    * ``int``/``float``: milliseconds (``1500``), rounded up to a whole ms —
      unless it is ``>= EPOCH_MS_THRESHOLD``: then it is an epoch-milliseconds
      timestamp and the result is the time until then.
    * ``str``: ``"<number> <unit>"`` — units ``seconds minutes hours days
      weeks`` (decimals allowed) and ``months years`` (whole numbers only,
      calendar arithmetic in UTC, clamped to month end: Jan 31 + 1 month =
      Feb 28/29), singular or plural, case and surrounding whitespace
      ignored, the space optional. Short forms: ``s sec secs min mins h hr
      hrs d w wk wks y yr yrs``; plain ``m`` is refused (minutes or months?).
    * ``str``: an ISO-8601 time with an offset (``"...Z"``, ``"+00:00"``,
      ``"+02:00"``); without one it is refused as ambiguous.
    * ``timedelta``; ``datetime`` if timezone-aware (naive is ambiguous).

    The result must be > 0 (not zero, not in the past) and at most
    :data:`MAX_DELAY` (366 days). ``bool`` is refused although it is an
    ``int``: ``after=True`` is a bug, not a 1 ms delay. ``now`` exists so tests
    and callers that already read the clock get consistent answers; it
    defaults to ``datetime.now(UTC)`` and must be timezone-aware.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now={now!r} must be timezone-aware (e.g. datetime.now(UTC))")

    if isinstance(after, bool):
        _refuse(after, "a bool is not a delay")
    if isinstance(after, int | float):
        if not math.isfinite(after):
            _refuse(after, "not a finite number")
        if after >= EPOCH_MS_THRESHOLD:
            return _checked(after, Fraction(after) - _epoch_ms(now))
        return _checked(after, after)
    if isinstance(after, str):
        return _parse_string(after, now)
    if isinstance(after, timedelta):
        return _from_timedelta(after, after)
    if isinstance(after, datetime):
        if after.tzinfo is None or after.utcoffset() is None:
            _refuse(after, "a naive datetime is ambiguous (give it a tzinfo, e.g. UTC)")
        return _from_timedelta(after, after - now)
    _refuse(after, f"unsupported type {type(after).__name__}")
