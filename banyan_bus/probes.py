"""The small HTTP server of ``banyan run --health-port``: ``/livez``, ``/readyz``, ``/metrics``.

- ``GET /livez``: 200 whenever the process's event loop answers. Liveness must not
  fail while the broker reconnects or the service drains: an orchestrator would
  restart a process that is doing the right thing.
- ``GET /readyz``: 200 with ``bus.health()`` as JSON when the bus is ready (running,
  connected, every consumer consuming), else 503 with the same JSON and its
  ``problems``: while starting, reconnecting, or draining on stop.
- ``GET /metrics``: the bus's metrics in Prometheus text format
  (``banyan_bus.prometheus``), when the server was built with ``metrics=True``.

Why not a web framework: three read-only routes do not justify a dependency in
every service; this is ``asyncio.start_server`` with HTTP/1.1, one request per
connection (``Connection: close``), GET and HEAD only, request heads bounded in
size and time so a stuck client cannot hold a probe.

Example::

    async with ProbeServer(bus, port=8000):
        await bus.start()
        ...
"""

from __future__ import annotations

import asyncio
import json
from types import TracebackType
from typing import TYPE_CHECKING, Self

import structlog

from banyan_bus import prometheus

if TYPE_CHECKING:
    from banyan_bus.bus import MessageBus

log = structlog.get_logger("banyan_bus.probes")

#: A request head larger than this, or slower than ``_READ_TIMEOUT_S``, is answered 400.
_MAX_HEAD = 8192
_READ_TIMEOUT_S = 5.0
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[503] = "Service Unavailable"


class ProbeServer:
    """Serves a bus's probes (and optionally its metrics) on ``host:port``.

    ``port=0`` picks a free port (read ``port`` after ``start``). ``probes=False``
    serves ``/metrics`` only (``banyan run --metrics-port`` on a port of its own).
    ``metrics=True`` needs the ``prometheus`` extra and calls
    :func:`banyan_bus.prometheus.install`: do it before the bus starts.
    """

    def __init__(
        self,
        bus: MessageBus,
        *,
        port: int,
        host: str = "0.0.0.0",  # a probe comes from the kubelet, not from localhost
        probes: bool = True,
        metrics: bool = False,
        probe_timeout: float = 2.0,
    ) -> None:
        self._bus = bus
        self._host = host
        self._port = port
        self._probes = probes
        self._metrics = metrics
        self._probe_timeout = probe_timeout
        self._server: asyncio.Server | None = None
        if metrics:
            prometheus.install(bus.service)

    @property
    def port(self) -> int:
        """The port listened on (the one picked when constructed with ``port=0``)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def routes(self) -> tuple[str, ...]:
        return (("/livez", "/readyz") if self._probes else ()) + (
            ("/metrics",) if self._metrics else ()
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("probe_server_listening", host=self._host, port=self.port, routes=self.routes)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- one request -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await self._respond(writer, 400, _TEXT, b"bad request\n", head_only=False)
                return
            if len(head) > _MAX_HEAD:
                await self._respond(writer, 400, _TEXT, b"request head too large\n", False)
                return
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, _TEXT, b"GET or HEAD only\n", False)
                return
            status, content_type, body = await self._route(path)
            await self._respond(writer, status, content_type, body, head_only=method == "HEAD")
        except (ConnectionError, OSError):
            pass  # the client left; nothing to answer
        except Exception:  # a probe must answer, and a bug here must not kill the server
            log.exception("probe_server_error")
            await self._respond(writer, 503, _TEXT, b"probe failed\n", False)
        finally:
            writer.close()

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        if self._probes and path == "/livez":
            body = {"live": True, "service": self._bus.service, "state": self._bus.state}
            return 200, _JSON, _dump(body)
        if self._probes and path == "/readyz":
            report = await self._bus.health(timeout=self._probe_timeout)
            return (200 if report.ready else 503), _JSON, _dump(report.to_dict())
        if self._metrics and path == "/metrics":
            return 200, prometheus.CONTENT_TYPE, prometheus.render()
        return 404, _TEXT, f"not found; try {', '.join(self.routes)}\n".encode()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes, head_only: bool
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        try:
            writer.write(head if head_only else head + body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass


def _dump(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def probe_servers(
    bus: MessageBus, *, health_port: int | None, metrics_port: int | None
) -> list[ProbeServer]:
    """What ``banyan run --health-port H --metrics-port M`` serves.

    ``H`` serves ``/livez`` and ``/readyz``, and ``/metrics`` too when the
    ``prometheus`` extra is installed; ``M`` (if another port) serves ``/metrics``
    alone and requires the extra.
    """
    servers = []
    if health_port is not None:
        with_metrics = prometheus.available() and metrics_port in (None, health_port)
        servers.append(ProbeServer(bus, port=health_port, metrics=with_metrics))
    if metrics_port is not None and metrics_port != health_port:
        servers.append(ProbeServer(bus, port=metrics_port, probes=False, metrics=True))
    return servers
