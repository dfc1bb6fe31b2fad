"""Health and metrics over real HTTP against the real RabbitMQ.

- In process: ``/readyz`` flips to 503 when the broker closes the connection
  (``close_connections`` through the management API) and back to 200 once aio-pika
  has reconnected and the consumers are back.
- As a user runs it: ``banyan run --health-port`` in a subprocess; ``/livez``,
  ``/readyz`` and ``/metrics``, whose Prometheus text has the bus's counters with
  their labels after events were handled (and the same after a handler failed).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from banyan_bus import MessageBus, RetryPolicy
from banyan_bus.probes import ProbeServer
from tests import brokers
from tests.integration.services.slow_service import WorkRequested

REPO = Path(__file__).resolve().parents[2]
SLOW = "tests.integration.services.slow_service:bus"


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError) as exc:  # not listening (yet)
        return 0, str(exc).encode()


async def wait_status(port: int, path: str, want: int, within: float) -> dict[str, object]:
    """Poll until ``path`` answers ``want``; its JSON body. Fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    last: tuple[int, bytes] = (0, b"")
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(http_get, port, path)
        if last[0] == want:
            body: dict[str, object] = json.loads(last[1])
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never answered {want} within {within}s; last: {last!r}")


async def test_readyz_flips_to_503_on_connection_loss_and_back_after_recovery(
    amqp_url: str, unique: Callable[[str], str]
) -> None:
    vhost = brokers.vhost_from_url(amqp_url)
    bus = MessageBus(service=unique("ready"), url=amqp_url, retry=RetryPolicy.none())
    handled: list[str] = []

    async def work(event: WorkRequested) -> None:
        handled.append(event.job_id)

    await bus.subscribe(WorkRequested, work)
    async with bus, ProbeServer(bus, port=0, host="127.0.0.1") as server:
        body = await wait_status(server.port, "/readyz", 200, 10)
        assert body["connected"] is True
        assert body["confirms_flowing"] is True
        # aio-pika reconnects about a second after the loss: poll /readyz (and /livez)
        # over HTTP all along, so the 503 window is seen however short it is.
        seen: list[tuple[int, dict[str, object]]] = []
        lively: list[int] = []
        polling = True

        async def poll() -> None:
            while polling:
                status, raw = await asyncio.to_thread(http_get, server.port, "/readyz", 5)
                seen.append((status, json.loads(raw) if status in (200, 503) else {}))
                if status == 503:
                    lively.append((await asyncio.to_thread(http_get, server.port, "/livez"))[0])

        poller = asyncio.create_task(poll())
        try:
            await asyncio.to_thread(brokers.close_connections, vhost, expect_at_least=1)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                refused = [i for i, (status, _) in enumerate(seen) if status == 503]
                if refused and any(status == 200 for status, _ in seen[refused[0] :]):
                    break
                await asyncio.sleep(0.05)
        finally:
            polling = False
            await poller
        statuses = [status for status, _ in seen]
        assert 503 in statuses, statuses
        first_503 = statuses.index(503)
        assert 200 in statuses[first_503:], statuses  # and back
        down = seen[first_503][1]
        assert down["ready"] is False
        assert down["problems"]
        assert set(lively) <= {200}  # reconnecting is alive
        body = await wait_status(server.port, "/readyz", 200, 30)
        assert body["connected"] is True
        assert all(c["consuming"] for c in body["consumers"])  # type: ignore[attr-defined]
        # Recovered for real: an event published now is handled.
        await bus.publish(WorkRequested(job_id="after-recovery"))
        for _ in range(100):
            if handled:
                break
            await asyncio.sleep(0.1)
        assert handled == ["after-recovery"]


# -- banyan run --health-port, as a subprocess ------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def run_service(amqp_url: str) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        banyan = shutil.which("banyan")
        assert banyan, "the `banyan` script is not installed: run `pip install -e .[dev]`"
        env = {**os.environ, "BANYAN_URL": amqp_url, "PYTHONUNBUFFERED": "1"}
        for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"):
            env.pop(name, None)
        proc = subprocess.Popen(
            [banyan, "--log-format", "json", "run", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{...}`` whose labels include ``labels``, if any."""
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[1]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match[2])
    return None


async def test_banyan_run_serves_probes_and_prometheus_metrics(
    amqp_url: str, run_service: Callable[..., subprocess.Popen[str]]
) -> None:
    port = free_port()
    proc = run_service(SLOW, "--health-port", str(port))
    try:
        await wait_status(port, "/readyz", 200, 30)
    except AssertionError:
        proc.terminate()
        raise AssertionError(proc.communicate(timeout=30)[0]) from None
    status, body = await asyncio.to_thread(http_get, port, "/livez")
    assert status == 200
    assert json.loads(body)["state"] == "running"

    publisher = MessageBus(service="health-test-publisher", url=amqp_url)
    async with publisher:
        await publisher.publish(WorkRequested(job_id="one"))
        await publisher.publish(WorkRequested(job_id="two"))
        await publisher.publish(WorkRequested(job_id="bad", fail=True))

    labels = {
        "banyan_message_type": WorkRequested.__message_type__,
        "messaging_consumer_group_name": "slow-service",
    }
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        status, raw = await asyncio.to_thread(http_get, port, "/metrics")
        assert status == 200
        text = raw.decode()
        if (_sample(text, "banyan_messages_handled_total", **labels) or 0) >= 2 and (
            _sample(text, "banyan_messages_dead_lettered_total", **labels) or 0
        ) >= 1:
            break
        await asyncio.sleep(0.2)
    assert _sample(text, "banyan_messages_handled_total", **labels) == 2, text
    assert _sample(text, "banyan_messages_failed_total", **labels) == 1, text
    assert _sample(text, "banyan_messages_dead_lettered_total", **labels) == 1, text
    assert _sample(text, "banyan_handler_duration_seconds_count", **labels) == 3, text
    assert "# TYPE banyan_messages_handled_total counter" in text
    handled = _sample(text, "banyan_messages_handled_total", **labels)
    assert handled is not None
    assert 'banyan_handler="' in text

    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.to_thread(proc.communicate, None, 40)
    assert proc.returncode == 0, out
    assert "probe_server_listening" in out


async def test_banyan_run_metrics_port_of_its_own(
    amqp_url: str, run_service: Callable[..., subprocess.Popen[str]]
) -> None:
    health, metrics = free_port(), free_port()
    proc = run_service(SLOW, "--health-port", str(health), "--metrics-port", str(metrics))
    try:
        await wait_status(health, "/readyz", 200, 30)
    except AssertionError:
        proc.terminate()
        raise AssertionError(proc.communicate(timeout=30)[0]) from None
    status, raw = await asyncio.to_thread(http_get, metrics, "/metrics")
    assert status == 200
    assert b"# TYPE" in raw
    assert (await asyncio.to_thread(http_get, metrics, "/readyz"))[0] == 404
    assert (await asyncio.to_thread(http_get, health, "/metrics"))[0] == 404
