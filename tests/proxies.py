"""A TCP proxy between a test's client and the local broker, for faults the broker cannot fake.

``BrokerProxy`` listens on 127.0.0.1 (a free port) and forwards every connection to the
broker. Two uses:

* **Partitions.** ``blackhole()`` stops forwarding in both directions while keeping every
  socket open: no FIN, no RST, exactly what a half-open connection looks like to both
  peers (a switch that died, a cable pulled, a NAT that forgot the flow). Bytes that
  arrive meanwhile are dropped, as the network would. New connections are accepted but
  get no answer either. ``heal()`` closes the connections that lived through the
  blackhole (their AMQP streams lost bytes and cannot continue) and forwards new ones.
* **TLS.** With ``server_ssl`` the proxy terminates TLS and forwards plain AMQP, so a
  test exercises the client's TLS (verification, mutual TLS) without reconfiguring the
  shared broker.

Only ever 127.0.0.1: the proxy connects to the broker's host and port given, which the
tests take from the local broker's URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time


class BrokerProxy:
    def __init__(
        self,
        upstream_port: int = 5672,
        *,
        upstream_host: str = "127.0.0.1",
        server_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server_ssl = server_ssl
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._open = asyncio.Event()
        self._open.set()
        self.port = 0
        self.accepted = 0
        self.blackholed_at: float | None = None
        self.dropped_bytes = 0

    async def __aenter__(self) -> BrokerProxy:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", 0, ssl=self._server_ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self._drop_all()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    def url(self, base: str, scheme: str = "amqp") -> str:
        """``base`` (an ``amqp://user:pass@host:port/vhost`` URL) pointed at this proxy."""
        from yarl import URL

        return str(URL(base).with_scheme(scheme).with_host("127.0.0.1").with_port(self.port))

    def blackhole(self) -> None:
        self._open.clear()
        self.blackholed_at = time.monotonic()

    def heal(self) -> None:
        self._drop_all()
        self._open.set()

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            await self._open.wait()
            if writer.is_closing():  # accepted during a blackhole, dropped at heal
                return
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except (OSError, asyncio.CancelledError):
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if not self._open.is_set():
                    self.dropped_bytes += len(data)  # the partition swallows it
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            dst.transport.abort()
