"""Test helpers that talk to the real RabbitMQ broker's management HTTP API.

Standard library only (``urllib``), so the helpers add no dependency.

Environment:

* ``BANYAN_TEST_AMQP_URL`` -- base AMQP URL (default ``amqp://guest:guest@127.0.0.1:5672/``).
  Its user and password are also used for the management API, and that user is the one
  granted permissions on the per-test vhosts.
* ``BANYAN_TEST_MANAGEMENT_URL`` -- management API root (default ``http://127.0.0.1:15672``).

Every call has a timeout; failures raise :class:`BrokerAdminError` with a message that names
the URL (never the password).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:15672"
HTTP_TIMEOUT = 30.0  # vhost creation is slow on a loaded 2-core machine

__all__ = [
    "DEFAULT_AMQP_URL",
    "DEFAULT_MANAGEMENT_URL",
    "BrokerAdminError",
    "amqp_base_url",
    "broker_reachable",
    "close_connections",
    "create_vhost",
    "delete_vhost",
    "list_bindings",
    "list_connections",
    "list_exchanges",
    "list_queues",
    "list_vhosts",
    "management_reachable",
    "management_url",
    "redact_url",
    "vhost_from_url",
    "vhost_url",
]


class BrokerAdminError(RuntimeError):
    """A management API call or broker probe failed."""


def amqp_base_url() -> str:
    """The AMQP URL of the test broker (``BANYAN_TEST_AMQP_URL`` or the local default)."""
    return os.environ.get("BANYAN_TEST_AMQP_URL") or DEFAULT_AMQP_URL


def management_url() -> str:
    """Root of the management HTTP API, without a trailing slash."""
    return (os.environ.get("BANYAN_TEST_MANAGEMENT_URL") or DEFAULT_MANAGEMENT_URL).rstrip("/")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _credentials() -> tuple[str, str]:
    parts = urlsplit(amqp_base_url())
    user = unquote(parts.username) if parts.username else "guest"
    password = unquote(parts.password) if parts.password is not None else "guest"
    return user, password


def _q(segment: str) -> str:
    """Percent-encode one path segment (``/`` included, so the default vhost is ``%2F``)."""
    return quote(segment, safe="")


def _request(
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = HTTP_TIMEOUT,
    ok_statuses: tuple[int, ...] = (),
    headers: dict[str, str] | None = None,
) -> Any:
    """Call the management API; return the parsed JSON body (``None`` when empty).

    HTTP statuses in ``ok_statuses`` (besides 2xx) are not errors and give ``None``.
    """
    url = f"{management_url()}{path}"
    user, password = _credentials()
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Basic {token}")
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    shown = redact_url(url)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in ok_statuses:
            return None
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise BrokerAdminError(
            f"RabbitMQ management API: {method} {shown} -> HTTP {exc.code} {exc.reason}: {detail}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BrokerAdminError(
            f"RabbitMQ management API unreachable: {method} {shown}: {reason} "
            "(is the rabbitmq_management plugin enabled? `bash scripts/services.sh rabbitmq`)"
        ) from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BrokerAdminError(
            f"RabbitMQ management API: {method} {shown}: bad JSON: {exc}"
        ) from None


# -- vhosts -----------------------------------------------------------------------------------


def vhost_url(name: str) -> str:
    """The AMQP URL of vhost ``name`` on the test broker (vhost percent-encoded in the path)."""
    parts = urlsplit(amqp_base_url())
    return urlunsplit(parts._replace(path="/" + _q(name)))


def vhost_from_url(url: str) -> str:
    """The vhost an AMQP URL points at (``/`` when the path is empty, as the AMQP URI spec says)."""
    path = urlsplit(url).path
    if path in ("", "/"):
        return "/"
    return unquote(path[1:])


def create_vhost(name: str, *, timeout: float = HTTP_TIMEOUT) -> str:
    """Create vhost ``name``, grant the test user full rights on it, return its AMQP URL."""
    user, _ = _credentials()
    _request("PUT", f"/api/vhosts/{_q(name)}", {}, timeout=timeout)
    _request(
        "PUT",
        f"/api/permissions/{_q(name)}/{_q(user)}",
        {"configure": ".*", "write": ".*", "read": ".*"},
        timeout=timeout,
    )
    return vhost_url(name)


def delete_vhost(name: str, *, missing_ok: bool = True, timeout: float = 30.0) -> None:
    """Delete vhost ``name`` and everything in it (its connections are closed by the broker)."""
    _request(
        "DELETE",
        f"/api/vhosts/{_q(name)}",
        timeout=timeout,
        ok_statuses=(404,) if missing_ok else (),
    )


def retire_vhost(name: str) -> bool:
    """Delete ``name`` once nothing is connected to it; False if a client keeps coming back.

    RabbitMQ 3.10 can wedge its vhost machinery (every later vhost create hangs)
    when a vhost is deleted while a client is reconnecting into it, as a robust
    connection left open by a failed test does. So: close the vhost's
    connections, give reconnecting clients a moment, and delete only if none
    came back; the caller defers the rest to the end of the session.
    """
    for _ in range(3):
        if not list_connections(name):
            time.sleep(0.05)
            if not list_connections(name):
                delete_vhost(name)
                return True
        close_connections(name)
        time.sleep(0.3)
    return False


def list_vhosts(*, timeout: float = HTTP_TIMEOUT) -> list[dict[str, Any]]:
    """All vhosts, as the management API describes them."""
    result: list[dict[str, Any]] = _request("GET", "/api/vhosts", timeout=timeout) or []
    return result


# -- the broker's view of a vhost's topology ---------------------------------------------------


def list_queues(vhost: str, *, timeout: float = HTTP_TIMEOUT) -> list[dict[str, Any]]:
    """Queues of ``vhost`` (each a dict with ``name``, ``type``, ``arguments``, ``durable``...).

    Message counts in these dicts come from periodic stats and may lag by a few seconds.
    """
    result: list[dict[str, Any]] = _request("GET", f"/api/queues/{_q(vhost)}", timeout=timeout)
    return result or []


def list_exchanges(vhost: str, *, timeout: float = HTTP_TIMEOUT) -> list[dict[str, Any]]:
    """Exchanges of ``vhost`` (built-in ``amq.*`` and the default ``""`` included)."""
    result: list[dict[str, Any]] = _request("GET", f"/api/exchanges/{_q(vhost)}", timeout=timeout)
    return result or []


def list_bindings(vhost: str, *, timeout: float = HTTP_TIMEOUT) -> list[dict[str, Any]]:
    """Bindings of ``vhost`` (``source``, ``destination``, ``destination_type``, ``routing_key``,
    ``arguments``), the default exchange's implicit ones included."""
    result: list[dict[str, Any]] = _request("GET", f"/api/bindings/{_q(vhost)}", timeout=timeout)
    return result or []


# -- connections (fault injection) ------------------------------------------------------------


def list_connections(vhost: str, *, timeout: float = HTTP_TIMEOUT) -> list[dict[str, Any]]:
    """Client connections open on ``vhost`` (the list may lag a connect by a moment)."""
    result: list[dict[str, Any]] = _request(
        "GET", f"/api/vhosts/{_q(vhost)}/connections", timeout=timeout
    )
    return result or []


def close_connections(
    vhost: str,
    *,
    reason: str = "closed by banyan_bus test",
    expect_at_least: int = 0,
    wait: float = 10.0,
    timeout: float = HTTP_TIMEOUT,
) -> int:
    """Force-close every client connection of ``vhost``; return how many were closed.

    The management API learns of a new connection a moment after it opens; with
    ``expect_at_least=N`` this waits (up to ``wait`` seconds) until N connections are listed,
    and raises :class:`BrokerAdminError` if they never show up.
    """
    deadline = time.monotonic() + wait
    while True:
        conns = list_connections(vhost, timeout=timeout)
        if len(conns) >= expect_at_least:
            break
        if time.monotonic() >= deadline:
            raise BrokerAdminError(
                f"expected at least {expect_at_least} connection(s) on vhost {vhost!r}, "
                f"saw {len(conns)} after {wait:.0f}s ({management_url()})"
            )
        time.sleep(0.2)
    closed = 0
    for conn in conns:
        _request(
            "DELETE",
            f"/api/connections/{_q(str(conn['name']))}",
            timeout=timeout,
            ok_statuses=(404,),  # already gone
            headers={"X-Reason": reason},
        )
        closed += 1
    return closed


# -- probes ------------------------------------------------------------------------------------


def _amqp_host_port() -> tuple[str, int]:
    parts = urlsplit(amqp_base_url())
    default_port = 5671 if parts.scheme == "amqps" else 5672
    return parts.hostname or "127.0.0.1", parts.port or default_port


def broker_reachable(timeout: float = 2.0) -> bool:
    """True if a TCP connection to the AMQP host:port of ``BANYAN_TEST_AMQP_URL`` succeeds."""
    host, port = _amqp_host_port()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def management_reachable(timeout: float = 5.0) -> bool:
    """True if the management API answers ``GET /api/overview`` with the test credentials."""
    try:
        _request("GET", "/api/overview", timeout=timeout)
    except BrokerAdminError:
        return False
    return True
