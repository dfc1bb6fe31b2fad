"""Per-run RabbitMQ vhosts through the management API (standard library only).

Every benchmark run gets a vhost of its own, so runs never see each other's
queues and a failed run leaves nothing behind for the next one.

Environment: ``BENCH_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``) and
``BENCH_MANAGEMENT_URL`` (default ``http://127.0.0.1:15672``); the AMQP URL's user and
password are used for the management API too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:15672"


class BrokerAdminError(RuntimeError):
    """The management API failed or did not answer: an infrastructure problem, not a
    benchmark result (``run.py`` retries such a run)."""


def amqp_base_url() -> str:
    return os.environ.get("BENCH_AMQP_URL") or DEFAULT_AMQP_URL


def management_url() -> str:
    return (os.environ.get("BENCH_MANAGEMENT_URL") or DEFAULT_MANAGEMENT_URL).rstrip("/")


def _credentials() -> tuple[str, str]:
    parts = urlsplit(amqp_base_url())
    user = unquote(parts.username) if parts.username else "guest"
    password = unquote(parts.password) if parts.password is not None else "guest"
    return user, password


def _request(
    method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (), timeout: float = 120
) -> Any:
    user, password = _credentials()
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{management_url()}{path}", data=data, method=method)
    req.add_header("Authorization", f"Basic {token}")
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in ok:
            return None
        raise BrokerAdminError(
            f"management API {method} {path}: HTTP {exc.code} {exc.read()[:300]!r}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise BrokerAdminError(
            f"management API unreachable at {management_url()} ({method} {path}): {exc}. "
            "Is RabbitMQ running with rabbitmq_management? `bash scripts/services.sh rabbitmq`"
        ) from None
    return json.loads(raw) if raw.strip() else None


def vhost_url(name: str) -> str:
    parts = urlsplit(amqp_base_url())
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


def create_vhost(name: str, attempts: int = 3) -> str:
    """Create vhost ``name`` with full rights for the benchmark user; return its AMQP URL.

    A busy shared broker sometimes takes many seconds to create a vhost (seen: 20 s
    while another suite hammered it), so each call waits up to 2 minutes, and a failed
    attempt is retried after deleting whatever half-exists.
    """
    user, _ = _credentials()
    for attempt in range(1, attempts + 1):
        try:
            _request("PUT", f"/api/vhosts/{quote(name, safe='')}", {})
            _request(
                "PUT",
                f"/api/permissions/{quote(name, safe='')}/{quote(user, safe='')}",
                {"configure": ".*", "write": ".*", "read": ".*"},
            )
            return vhost_url(name)
        except BrokerAdminError:
            with contextlib.suppress(BrokerAdminError):
                delete_vhost(name)
            if attempt == attempts:
                raise
            time.sleep(2 * attempt)
    raise AssertionError("unreachable")


def delete_vhost(name: str) -> None:
    _request("DELETE", f"/api/vhosts/{quote(name, safe='')}", ok=(404,))


def broker_overview() -> dict[str, Any]:
    result: dict[str, Any] = _request("GET", "/api/overview") or {}
    return result
