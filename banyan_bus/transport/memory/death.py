"""Dead-letter headers and cycle detection, as RabbitMQ's ``rabbit_dead_letter`` does them.

The bus reads these headers (the DLQ record, retries that strip them before
republishing), and RabbitMQ 3.10 *trusts* an ``x-death`` a client copied into a
new publish when it decides whether a dead-lettering closes a cycle. Getting
either detail wrong in memory would hide a bug that loses messages on a real
broker, so both are written here once, as pure functions of the headers.
"""

from __future__ import annotations

from datetime import UTC, datetime

from banyan_bus.transport.base import Headers, HeaderValue


def with_death(
    headers: Headers, *, queue: str, reason: str, exchange: str, routing_key: str
) -> Headers:
    """The headers RabbitMQ gives a message dead-lettered out of ``queue``.

    An ``x-death`` entry per (queue, reason), counted and moved to the front on
    repeats, and the ``x-first-death-*`` headers on the first death only.
    ``exchange`` and ``routing_key`` are where the message was published to.
    """
    headers = dict(headers)
    previous = headers.get("x-death")
    deaths: list[HeaderValue] = list(previous) if isinstance(previous, list) else []
    count = 1
    for death in deaths:
        if isinstance(death, dict) and (death.get("queue"), death.get("reason")) == (queue, reason):
            old = death.get("count")
            count = old + 1 if isinstance(old, int) else 1
            break
    rest = [
        d
        for d in deaths
        if not (isinstance(d, dict) and (d.get("queue"), d.get("reason")) == (queue, reason))
    ]
    if not isinstance(previous, list):
        headers["x-first-death-reason"] = reason
        headers["x-first-death-queue"] = queue
        headers["x-first-death-exchange"] = exchange
    entry: dict[str, HeaderValue] = {
        "count": count,
        "reason": reason,
        "queue": queue,
        "time": datetime.now(UTC).replace(microsecond=0),
        "exchange": exchange,
        "routing-keys": [routing_key],
    }
    headers["x-death"] = [entry, *rest]
    return headers


def is_cycle(headers: Headers, target: str) -> bool:
    """Whether dead-lettering into ``target`` closes a fully automatic cycle.

    RabbitMQ drops such a message: it died in ``target`` before and nothing on
    the way since was a rejection by a client (which would be a decision, not a
    loop). Only deaths other than ``rejected`` count.
    """
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return False
    for death in deaths:
        if not isinstance(death, dict) or death.get("reason") == "rejected":
            return False
        if death.get("queue") == target:
            return True
    return False
