"""The ``banyan`` command as a user runs it: subprocesses against the real RabbitMQ.

Services run with ``banyan run`` (example services, and a test-only slow one in
``tests/integration/services``), events go in with ``banyan publish``, and the
tests read what the processes print. The graceful-shutdown tests then look at
the broker itself: a message is either handled and acked, or back in its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banyan_bus.bus import make_transport
from banyan_bus.topology import dead_letter_queue, group_exchange
from tests import brokers

REPO = Path(__file__).resolve().parents[2]
SLOW = "tests.integration.services.slow_service:bus"
EMAIL = "examples.signup.email_service:bus"
ANALYTICS = "examples.signup.analytics_service:bus"
USERS = "examples.signup.user_service:bus"
UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"
START_TIMEOUT = 30.0


def _banyan() -> str:
    path = shutil.which("banyan")
    assert path, "the `banyan` script is not installed: run `pip install -e .[dev]`"
    return path


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "BANYAN_URL": url, "PYTHONUNBUFFERED": "1"}


class Service:
    """A ``banyan run`` subprocess whose JSON log lines are collected as they come."""

    def __init__(self, args: list[str], url: str) -> None:
        self.proc = subprocess.Popen(
            [_banyan(), "--log-format", "json", *args],
            cwd=REPO,
            env=_env(url),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The structlog lines, parsed (anything else the process printed is skipped)."""
        with self._changed:
            lines = list(self.lines)
        parsed = []
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    parsed.append(record)
        return parsed

    def events(self, event: str, **fields: object) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
        ]

    def position(self, event: str, **fields: object) -> int:
        """Index of the first such line among all log lines (for before/after checks)."""
        for index, record in enumerate(self.records):
            if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                return index
        raise AssertionError(f"no {event} {fields} in:\n{self.output}")

    def wait_for(
        self, event: str, *, count: int = 1, timeout: float = 15.0, **fields: object
    ) -> list[dict[str, Any]]:
        """The first ``count`` log lines of ``event`` with ``fields``; fails on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(event, **fields)
            if len(found) >= count:
                return found[:count]
            with self._changed:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {count} {event} line(s) with {fields} within {timeout} s; "
                        f"output:\n{chr(10).join(self.lines)}"
                    )
                self._changed.wait(min(left, 0.2))

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Every service a test starts; whatever is still running at the end is killed."""
    started: list[Service] = []
    yield started
    for service in started:
        service.kill()


def start(started: list[Service], url: str, *args: str) -> Service:
    service = Service(["run", *args], url)
    started.append(service)
    service.wait_for("service_running", timeout=START_TIMEOUT)
    return service


def banyan(
    *args: str, url: str = "memory://", timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_banyan(), *args],
        cwd=REPO,
        env=_env(url),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def publish(
    url: str, target: str, message_type: str, payload: dict[str, object], *extra: str
) -> str:
    result = banyan("publish", target, message_type, json.dumps(payload), *extra, url=url)
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip()
    assert message_id.startswith("evt_"), result.stdout
    return message_id


async def queue_counts(url: str, *queues: str) -> dict[str, int | None]:
    """Ready messages per queue, by passive declare (exact, unlike the management stats)."""
    transport = make_transport(url, name="test-cli-inspect")
    await transport.connect()
    try:
        counts: dict[str, int | None] = {}
        for queue in queues:
            state = await transport.queue_state(queue)
            counts[queue] = None if state is None else state.messages
        return counts
    finally:
        await transport.close()


def user_created(n: int) -> dict[str, object]:
    return {
        "userId": f"usr_cli_{n}",
        "email": f"user{n}@example.com",
        "name": f"User {n}",
        "createdAt": "2025-01-01T00:00:00Z",
    }


# -- run + publish: two example services --------------------------------------------------


def test_two_example_services_handle_a_published_event(
    amqp_url: str, services: list[Service]
) -> None:
    email = start(services, amqp_url, EMAIL)
    analytics = start(services, amqp_url, ANALYTICS)

    # UserCreated v1: the version the example handlers serve (v2 is the latest).
    event_id = publish(amqp_url, USERS, "UserCreated", user_created(1), "--version", "1")

    [sent] = email.wait_for("welcome_email_sent", event_id=event_id)
    assert sent["to"] == "user1@example.com"
    # The bus binds the message's context to every line a handler logs.
    assert sent["message_type"] == "UserCreated"
    assert sent["group"] == "email-service"
    analytics.wait_for("signup_counted", event_id=event_id)
    # email-service published EmailSent from inside its handler; analytics counts it too.
    [counted] = analytics.wait_for("email_counted", template="welcome")
    assert counted["causation_id"] == event_id

    for service in (email, analytics):
        service.signal(signal.SIGTERM)
    for service in (email, analytics):
        assert service.wait() == 0, service.output
        service.wait_for("service_stopped", timeout=1)
    queues = [
        group_exchange("email-service", "UserCreated"),
        group_exchange("analytics-service", "UserCreated"),
        group_exchange("analytics-service", "EmailSent"),
    ]
    counts = asyncio.run(queue_counts(amqp_url, *queues, *(f"dlq.{q}" for q in queues)))
    assert counts == dict.fromkeys(counts, 0), counts


# -- graceful shutdown --------------------------------------------------------------------


def test_sigterm_lets_the_in_flight_handler_finish_and_leaves_the_rest_queued(
    amqp_url: str, services: list[Service]
) -> None:
    slow = start(services, amqp_url, SLOW, "--grace", "20")
    queue = group_exchange("slow-service", "WorkRequested")
    first = publish(amqp_url, SLOW, "WorkRequested", {"jobId": "long", "seconds": 3})
    publish(amqp_url, SLOW, "WorkRequested", {"jobId": "next", "seconds": 0})
    slow.wait_for("work_started", event_id=first)

    slow.signal(signal.SIGTERM)
    assert slow.wait(timeout=20) == 0, slow.output
    assert slow.position("service_stopping") < slow.position("work_finished", event_id=first)
    assert not slow.events("work_started", job_id="next"), "a job started after SIGTERM"
    # The long job was acked; the next one never left the queue; nothing dead-lettered.
    counts = asyncio.run(
        queue_counts(amqp_url, queue, dead_letter_queue("slow-service", "WorkRequested"))
    )
    assert list(counts.values()) == [1, 0], counts

    # A new instance takes the waiting job: nothing was lost.
    again = start(services, amqp_url, SLOW)
    again.wait_for("work_finished", job_id="next")
    again.signal(signal.SIGINT)
    assert again.wait() == 0, again.output
    assert list(asyncio.run(queue_counts(amqp_url, queue)).values()) == [0]


def test_a_handler_past_the_grace_period_goes_back_to_its_queue(
    amqp_url: str, services: list[Service]
) -> None:
    slow = start(services, amqp_url, SLOW, "--grace", "0.5")
    event_id = publish(amqp_url, SLOW, "WorkRequested", {"jobId": "endless", "seconds": 60})
    slow.wait_for("work_started", event_id=event_id)

    # The handler would sleep 60 s: exiting well before proves the grace period cut it off.
    slow.signal(signal.SIGTERM)
    assert slow.wait(timeout=30) == 0, slow.output
    assert not slow.events("work_finished")
    slow.wait_for("grace_period_over", timeout=1)
    queue = group_exchange("slow-service", "WorkRequested")
    counts = asyncio.run(
        queue_counts(amqp_url, queue, dead_letter_queue("slow-service", "WorkRequested"))
    )
    assert list(counts.values()) == [1, 0], counts


def test_workers_run_one_bus_each_and_stop_together(amqp_url: str, services: list[Service]) -> None:
    supervisor = Service(["run", SLOW, "--workers", "2"], amqp_url)
    services.append(supervisor)
    running = supervisor.wait_for("service_running", count=2, timeout=START_TIMEOUT)
    assert {r["worker"] for r in running} == {"0", "1"}
    assert len({r["pid"] for r in running}) == 2
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait() == 0, supervisor.output
    supervisor.wait_for("service_stopped", count=2, timeout=1)
    supervisor.wait_for("workers_stopped", timeout=1)


# -- topology and dlq against the broker ----------------------------------------------------


def test_topology_declare_creates_the_service_queues_on_the_broker(amqp_url: str) -> None:
    result = banyan("topology", EMAIL, "--declare", "--json", url=amqp_url)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    names = {d["name"] for d in plan if d["kind"] == "queue"}
    queue = group_exchange("email-service", "UserCreated")
    assert {queue, f"dlq.{queue}"} <= names
    assert "declared" in result.stderr
    on_broker = {q["name"] for q in brokers.list_queues(brokers.vhost_from_url(amqp_url))}
    assert names <= on_broker


def test_dlq_list_and_purge_a_failed_message(amqp_url: str, services: list[Service]) -> None:
    slow = start(services, amqp_url, SLOW)
    event_id = publish(amqp_url, SLOW, "WorkRequested", {"jobId": "broken", "fail": True})
    slow.wait_for("dead_lettered", message_id=event_id)
    slow.signal(signal.SIGTERM)
    assert slow.wait() == 0, slow.output

    listed = banyan("dlq", "list", SLOW, "--json", url=amqp_url)
    assert listed.returncode == 0, listed.stderr
    [dead] = json.loads(listed.stdout)[dead_letter_queue("slow-service", "WorkRequested")]
    assert dead["message_id"] == event_id
    assert dead["reason"] == "handler-failed"
    assert dead["exception_type"] == "JobFailed"

    purged = banyan(
        "dlq", "purge", SLOW, "--type", "WorkRequested", "--id", event_id, "--yes", url=amqp_url
    )
    assert purged.returncode == 0, purged.stderr
    assert "deleted 1 message" in purged.stdout


# -- errors: one line, no traceback, non-zero exit ----------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("banyan: error: "), lines
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["publish", "no_such_module:bus", "UserCreated", "{}"], ["no module named"]),
        (["publish", "examples.signup.user_service:nope", "UserCreated", "{}"], ["no attribute"]),
        (["publish", "examples.signup.user_service", "UserCreated", "{}"], ["module:attribute"]),
        (
            ["publish", "examples.signup.user_service:SERVICE", "UserCreated", "{}"],
            ["not a MessageBus"],
        ),
        (
            ["publish", USERS, "UserCreatd", "{}"],
            ["unknown message type", "did you mean 'UserCreated'"],
        ),
        (["publish", USERS, "UserCreated", "{not json"], ["not valid JSON"]),
        (["publish", USERS, "UserCreated", "[1, 2]"], ["JSON object"]),
        (
            ["publish", USERS, "UserCreated", '{"userId": "u"}', "--version", "1"],
            ["does not fit UserCreated v1", "email"],
        ),
        (["publish", USERS, "CreateUser", "{}"], ["is a command"]),
        (["topology", "no_such_module:bus"], ["no module named"]),
    ],
    ids=[
        "bad-module",
        "bad-attribute",
        "no-colon",
        "not-a-bus",
        "unknown-type",
        "invalid-json",
        "not-an-object",
        "invalid-payload",
        "command",
        "topology-bad-module",
    ],
)
def test_user_errors_are_one_line_with_exit_2(args: list[str], needles: list[str]) -> None:
    result = banyan(*args)
    assert_one_line_error(result, *needles)
    assert result.returncode == 2


@pytest.mark.parametrize("command", ["publish", "run", "topology-declare"])
def test_an_unreachable_broker_is_one_line(command: str) -> None:
    args = {
        "publish": ["publish", USERS, "UserCreated", json.dumps(user_created(1)), "--version", "1"],
        "run": ["run", EMAIL],
        "topology-declare": ["topology", EMAIL, "--declare", "--json"],
    }[command]
    result = banyan(*args, url=UNREACHABLE)
    assert_one_line_error(result, "cannot connect to RabbitMQ", "127.0.0.1:1")
    assert result.returncode == 1
    assert "guest:guest@" not in result.stderr  # the password is masked


def test_debug_shows_the_traceback() -> None:
    result = banyan("--debug", "publish", USERS, "UserCreated", "{not json")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_dlq_show_and_replay_back_to_the_group(amqp_url: str, services: list[Service]) -> None:
    slow = start(services, amqp_url, SLOW)
    event_id = publish(amqp_url, SLOW, "WorkRequested", {"jobId": "broken", "fail": True})
    slow.wait_for("dead_lettered", message_id=event_id)
    slow.signal(signal.SIGTERM)
    assert slow.wait() == 0, slow.output

    shown = banyan("dlq", "show", SLOW, event_id, "--type", "WorkRequested", url=amqp_url)
    assert shown.returncode == 0, shown.stderr
    assert event_id in shown.stdout
    assert "JobFailed" in shown.stdout
    assert "handler-failed" in shown.stdout

    replayed = banyan(
        "dlq", "replay", SLOW, "--type", "WorkRequested", "--id", event_id, "--json", url=amqp_url
    )
    assert replayed.returncode == 0, replayed.stderr
    # Back in the group's own queue (its consumer is stopped), gone from the DLQ.
    queue = group_exchange("slow-service", "WorkRequested")
    dlq = dead_letter_queue("slow-service", "WorkRequested")
    counts = asyncio.run(queue_counts(amqp_url, queue, dlq))
    assert counts == {queue: 1, dlq: 0}
