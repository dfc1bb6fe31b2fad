"""TLS to the broker, through a local TLS endpoint (tests/proxies.py) with a CA made by the
test (tests/certs.py): verification is on by default, a wrong CA is refused, mutual TLS
works, and an ``ssl.SSLContext`` built in code is accepted."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from banyan_bus import Event, MessageBus
from banyan_bus.errors import BrokerUnreachable
from banyan_bus.transport.amqp import AmqpTransport
from tests.certs import Pki, make_pki
from tests.proxies import BrokerProxy
from tests.support import wait_until


class CertificateRotated(Event):
    cert_id: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_context(pki: Pki, *, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


@pytest.fixture
async def tls_proxy(pki: Pki) -> AsyncIterator[BrokerProxy]:
    async with BrokerProxy(server_ssl=_server_context(pki, require_client_cert=False)) as p:
        yield p


@pytest.fixture
async def mtls_proxy(pki: Pki) -> AsyncIterator[BrokerProxy]:
    async with BrokerProxy(server_ssl=_server_context(pki, require_client_cert=True)) as p:
        yield p


def _q(path: Path) -> str:
    return quote(str(path), safe="/")


async def _round_trip(url: str, **bus_options: object) -> list[str]:
    seen: list[str] = []

    async def handle(event: CertificateRotated) -> None:
        seen.append(event.cert_id)

    bus = MessageBus("tls-audit", url, **bus_options)  # type: ignore[arg-type]
    await bus.subscribe(CertificateRotated, handle)
    async with bus:
        for i in range(5):
            await bus.publish(CertificateRotated(cert_id=f"c{i}"))
        await wait_until(lambda: len(seen) == 5, timeout=15, what="5 events over TLS")
    return seen


async def test_amqps_with_the_right_ca_publishes_and_consumes(
    amqp_url: str, tls_proxy: BrokerProxy, pki: Pki
) -> None:
    url = tls_proxy.url(amqp_url, "amqps") + f"?cafile={_q(pki.ca)}"
    assert sorted(await _round_trip(url)) == [f"c{i}" for i in range(5)]
    assert tls_proxy.accepted >= 1


async def test_verification_is_on_by_default(amqp_url: str, tls_proxy: BrokerProxy) -> None:
    # No cafile: the system's CAs do not know the test CA, so the broker is not trusted.
    transport = AmqpTransport(tls_proxy.url(amqp_url, "amqps"), connect_timeout=5)
    with pytest.raises(BrokerUnreachable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        await transport.connect()


async def test_a_wrong_ca_is_refused(amqp_url: str, tls_proxy: BrokerProxy, pki: Pki) -> None:
    url = tls_proxy.url(amqp_url, "amqps") + f"?cafile={_q(pki.other_ca)}"
    with pytest.raises(BrokerUnreachable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        await AmqpTransport(url, connect_timeout=5).connect()


async def test_mutual_tls_needs_the_client_certificate(
    amqp_url: str, mtls_proxy: BrokerProxy, pki: Pki
) -> None:
    base = mtls_proxy.url(amqp_url, "amqps") + f"?cafile={_q(pki.ca)}"
    with pytest.raises(BrokerUnreachable):
        await AmqpTransport(base, connect_timeout=5).connect()
    url = base + f"&certfile={_q(pki.client_cert)}&keyfile={_q(pki.client_key)}"
    assert sorted(await _round_trip(url)) == [f"c{i}" for i in range(5)]


async def test_a_bus_takes_an_ssl_context_built_in_code(
    amqp_url: str, mtls_proxy: BrokerProxy, pki: Pki
) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.client_cert, pki.client_key)
    url = mtls_proxy.url(amqp_url, "amqps")
    assert sorted(await _round_trip(url, ssl_context=context)) == [f"c{i}" for i in range(5)]


async def test_an_ssl_context_built_in_code(
    amqp_url: str, mtls_proxy: BrokerProxy, pki: Pki
) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.client_cert, pki.client_key)
    transport = AmqpTransport(mtls_proxy.url(amqp_url, "amqps"), ssl_context=context)
    await transport.connect()
    try:
        await transport.declare_queue("tls-context-probe", arguments={"x-queue-type": "classic"})
        assert (await transport.queue_state("tls-context-probe")) is not None
    finally:
        await transport.close()
