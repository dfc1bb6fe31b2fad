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
    # `banyan run` first says which broker it uses; then the error is the one line.
    lines = [x for x in result.stderr.strip().splitlines() if " uses amqp" not in x]
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


# -- a CLI that never misleads (issue 18 §5) ----------------------------------------------

BROKEN = "tests.integration.services.broken_service:bus"


@pytest.mark.parametrize(
    "args",
    [
        ["publish", USERS, "UserCreated", json.dumps(user_created(1)), "--version", "1"],
        ["dlq", "list", EMAIL],
        ["dlq", "show", EMAIL, "evt_1"],
        ["topology", EMAIL, "--prune"],
    ],
    ids=["publish", "dlq-list", "dlq-show", "topology-prune"],
)
def test_commands_that_need_a_broker_refuse_memory(args: list[str]) -> None:
    result = banyan(*args, url="")  # BANYAN_URL unset: the bus falls back to memory://
    assert_one_line_error(result, "memory://", "set BANYAN_URL or pass --url")
    assert result.returncode == 2


@pytest.mark.parametrize("where", ["env", "option"])
def test_a_malformed_url_exits_2_quoting_it_masked(where: str) -> None:
    bad = "amqp//guest:s3cret@localhost:5672/"
    args = ["publish", USERS, "UserCreated", json.dumps(user_created(1)), "--version", "1"]
    if where == "env":
        result = banyan(*args, url=bad)
        origin = "BANYAN_URL"
    else:
        result = banyan(*args, "--url", bad, url="")
        origin = "--url"
    assert_one_line_error(result, "malformed broker URL 'amqp//guest:***@localhost:5672/'", origin)
    assert result.returncode == 2
    assert "s3cret" not in result.stderr
    run = banyan("run", EMAIL, url=bad)
    assert run.returncode == 2
    assert "malformed broker URL 'amqp//guest:***@localhost:5672/'" in run.stderr


@pytest.mark.parametrize(
    ("args", "quoted"),
    [
        (["publish", USERS, "UserCreated", "{not json"], "'{not json'"),
        (["publish", USERS, "UserCreated", "{}", "--after", "soonish"], "'soonish'"),
        (["publish", USERS, "UserCreated", "@/no/such/payload.json"], "'/no/such/payload.json'"),
    ],
    ids=["json", "after", "file"],
)
def test_bad_input_exits_2_and_quotes_it(args: list[str], quoted: str) -> None:
    result = banyan(*args)
    assert_one_line_error(result, quoted)
    assert result.returncode == 2


def test_run_says_which_broker_it_uses(amqp_url: str, services: list[Service]) -> None:
    slow = start(services, amqp_url, SLOW)
    user = amqp_url.split("://", 1)[1].split(":", 1)[0]
    [line] = [x for x in slow.lines if x.startswith("banyan: slow-service uses ")]
    assert f"amqp://{user}:***@" in line
    assert brokers.vhost_from_url(amqp_url) in line
    slow.signal(signal.SIGTERM)
    assert slow.wait() == 0

    on_memory = Service(["run", SLOW], "")
    services.append(on_memory)
    on_memory.wait_for("service_running", timeout=START_TIMEOUT)
    assert any(
        x.startswith("banyan: warning: slow-service runs on memory://") for x in on_memory.lines
    ), on_memory.output
    on_memory.signal(signal.SIGTERM)
    assert on_memory.wait() == 0


def test_publish_reads_a_large_payload_from_a_file_or_stdin(amqp_url: str, tmp_path: Path) -> None:
    declared = banyan("topology", SLOW, "--declare", url=amqp_url)
    assert declared.returncode == 0, declared.stderr
    # ~200 KiB: over the ~128 KiB a single argument may have, under the bus's 256 KiB.
    payload = json.dumps({"jobId": "x" * 200_000, "seconds": 0})
    path = tmp_path / "work.json"
    path.write_text(payload, encoding="utf-8")
    from_file = banyan("publish", SLOW, "WorkRequested", f"@{path}", url=amqp_url)
    assert from_file.returncode == 0, from_file.stderr
    from_stdin = subprocess.run(
        [_banyan(), "publish", SLOW, "WorkRequested", "-"],
        cwd=REPO,
        env=_env(amqp_url),
        input=payload,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout.startswith("evt_")
    queue = group_exchange("slow-service", "WorkRequested")
    assert asyncio.run(queue_counts(amqp_url, queue)) == {queue: 2}


def test_dlq_list_empty_one_line_ids_json_and_show_without_type(
    amqp_url: str, services: list[Service]
) -> None:
    declared = banyan("topology", SLOW, "--declare", url=amqp_url)
    assert declared.returncode == 0, declared.stderr
    dlq = dead_letter_queue("slow-service", "WorkRequested")
    empty = banyan("dlq", "list", SLOW, url=amqp_url)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == f"{dlq}: empty"

    slow = start(services, amqp_url, SLOW)
    event_id = publish(amqp_url, SLOW, "WorkRequested", {"jobId": "broken", "fail": True})
    slow.wait_for("dead_lettered", message_id=event_id)
    slow.signal(signal.SIGTERM)
    assert slow.wait() == 0, slow.output

    env_120 = {"COLUMNS": "120"}
    listed = subprocess.run(
        [_banyan(), "dlq", "list", SLOW],
        cwd=REPO,
        env={**_env(amqp_url), **env_120},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert any(event_id in line for line in listed.stdout.splitlines()), listed.stdout
    assert dlq in listed.stdout

    as_json = banyan("dlq", "list", SLOW, "--output", "json", url=amqp_url)
    assert as_json.returncode == 0, as_json.stderr
    [dead] = json.loads(as_json.stdout)[dlq]
    assert dead["message_id"] == event_id

    shown = banyan("dlq", "show", SLOW, event_id, url=amqp_url)  # no --type: one subscription
    assert shown.returncode == 0, shown.stderr
    assert "JobFailed" in shown.stdout


# Terminal escape sequences a hostile publisher could put in an id or a header.
HOSTILE_ID = (
    "evt_hostile\x1b]0;pwned\x07\x1b[2J"
    "\x1b]8;;https://evil.example/\x1b\\click-me\x1b]8;;\x1b\\"
    "\u202etxt.exe\x9b31m"
)
_TERMINAL_CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e", "\x9d")


async def _put_hostile_dead_letter(url: str) -> None:
    from banyan_bus.transport.base import OutgoingMessage

    transport = make_transport(url, name="test-cli-hostile")
    await transport.connect()
    try:
        body = json.dumps({"id": HOSTILE_ID, "messageType": "WorkRequested", "payload": {}})
        await transport.publish(
            "",
            dead_letter_queue("slow-service", "WorkRequested"),
            OutgoingMessage(
                body=body.encode(),
                message_id=HOSTILE_ID,
                message_type="WorkRequested\x1b[31m",
                headers={"x-evil": "\x1b]0;title\x07header", "x-exception-message": "\x1b[2Jboom"},
            ),
        )
    finally:
        await transport.close()


def test_dlq_output_strips_terminal_control_sequences(amqp_url: str) -> None:
    declared = banyan("topology", SLOW, "--declare", url=amqp_url)
    assert declared.returncode == 0, declared.stderr
    asyncio.run(_put_hostile_dead_letter(amqp_url))

    listed = banyan("dlq", "list", SLOW, url=amqp_url)
    assert listed.returncode == 0, listed.stderr
    shown = banyan("dlq", "show", SLOW, "evt_hostileclick-metxt.exe", url=amqp_url)
    assert shown.returncode == 0, shown.stderr
    for result in (listed, shown):
        printed = result.stdout + result.stderr
        assert not any(c in printed for c in _TERMINAL_CONTROLS), repr(printed)
        # Outside the envelope (JSON, its controls shown as \u001b) nothing of them is left.
        plain = printed.split("envelope:")[0]
        assert "pwned" not in plain
        assert "evil.example" not in plain
    assert "evt_hostileclick-metxt.exe" in listed.stdout
    assert "header" in shown.stdout

    # JSON keeps the exact id (a script can act on it) with the controls escaped.
    as_json = banyan("dlq", "list", SLOW, "--output", "json", url=amqp_url)
    assert as_json.returncode == 0, as_json.stderr
    assert not any(c in as_json.stdout for c in _TERMINAL_CONTROLS)
    [dead] = json.loads(as_json.stdout)[dead_letter_queue("slow-service", "WorkRequested")]
    assert dead["message_id"] == HOSTILE_ID


def test_topology_shows_the_service_first_and_summarises_the_delay_levels() -> None:
    result = banyan("topology", EMAIL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) < 40, result.stdout
    assert "banyan.delay.level" not in result.stdout
    [summary] = [x for x in lines if "shared delay infrastructure" in x]
    assert "--all" in summary
    own = next(i for i, x in enumerate(lines) if "email-service" in x)
    root = next(i for i, x in enumerate(lines) if "exchange.platform.events " in x + " ")
    assert own < root
    everything = banyan("topology", EMAIL, "--all")
    assert everything.returncode == 0, everything.stderr
    assert "banyan.delay.level.27" in everything.stdout


def test_topology_prune_lists_and_deletes_retired_queues(amqp_url: str) -> None:
    from banyan_bus.topology import QueueOptions, apply, group_plan

    async def retired_subscription(message: bool) -> None:
        transport = make_transport(amqp_url, name="test-cli-prune")
        await transport.connect()
        try:
            await apply(transport, group_plan("slow-service", "WorkRetired", QueueOptions()))
            if message:
                from banyan_bus.transport.base import OutgoingMessage

                await transport.publish(
                    group_exchange("slow-service", "WorkRetired"), "", OutgoingMessage(body=b"{}")
                )
        finally:
            await transport.close()

    assert banyan("topology", SLOW, "--declare", url=amqp_url).returncode == 0
    asyncio.run(retired_subscription(message=True))
    retired = group_exchange("slow-service", "WorkRetired")

    dry = banyan("topology", SLOW, "--prune", "--json", url=amqp_url)
    assert dry.returncode == 0, dry.stderr
    found = {(s["kind"], s["name"]): s for s in json.loads(dry.stdout)}
    assert set(found) == {("queue", retired), ("queue", f"dlq.{retired}"), ("exchange", retired)}
    assert found[("queue", retired)]["messages"] == 1
    assert group_exchange("slow-service", "WorkRequested") not in dry.stdout

    kept = banyan("topology", SLOW, "--prune", "--yes", "--json", url=amqp_url)
    assert kept.returncode == 0, kept.stderr
    actions = {(s["kind"], s["name"]): s["action"] for s in json.loads(kept.stdout)}
    assert actions[("queue", retired)].startswith("kept")
    assert actions[("queue", f"dlq.{retired}")] == "deleted"
    on_broker = {q["name"] for q in brokers.list_queues(brokers.vhost_from_url(amqp_url))}
    assert retired in on_broker
    assert f"dlq.{retired}" not in on_broker

    forced = banyan("topology", SLOW, "--prune", "--yes", "--force", url=amqp_url)
    assert forced.returncode == 0, forced.stderr
    assert "deleted" in forced.stdout
    on_broker = {q["name"] for q in brokers.list_queues(brokers.vhost_from_url(amqp_url))}
    assert retired not in on_broker
    assert group_exchange("slow-service", "WorkRequested") in on_broker
    assert retired not in {
        e["name"] for e in brokers.list_exchanges(brokers.vhost_from_url(amqp_url))
    }


def test_a_second_ctrl_c_exits_at_once_quietly(amqp_url: str, services: list[Service]) -> None:
    slow = start(services, amqp_url, SLOW, "--grace", "30")
    event_id = publish(amqp_url, SLOW, "WorkRequested", {"jobId": "endless", "seconds": 60})
    slow.wait_for("work_started", event_id=event_id)
    slow.signal(signal.SIGINT)
    slow.wait_for("service_stopping")
    began = time.monotonic()
    slow.signal(signal.SIGINT)
    assert slow.wait(timeout=10) == 130, slow.output
    assert time.monotonic() - began < 5
    warnings = [x for x in slow.lines if x.startswith("banyan: second signal")]
    assert len(warnings) == 1, slow.output
    assert "go back to their queue" in warnings[0]
    for noise in ("Traceback", "Task was destroyed", "Event loop is closed"):
        assert noise not in slow.output, slow.output
    # The unfinished delivery is back in the queue: nothing lost.
    queue = group_exchange("slow-service", "WorkRequested")
    deadline = time.monotonic() + 10
    while asyncio.run(queue_counts(amqp_url, queue))[queue] != 1:
        assert time.monotonic() < deadline, "the unacked delivery did not come back"
        time.sleep(0.2)


def test_a_dependency_error_with_workers_is_reported_once(amqp_url: str) -> None:
    result = banyan("run", BROKEN, "--workers", "2", url=amqp_url, timeout=60)
    assert result.returncode == 1
    errors = [x for x in result.stderr.splitlines() if x.startswith("banyan: error:")]
    assert len(errors) == 1, result.stderr
    assert "ArchiveLedger" in errors[0]
    assert "ledger" in errors[0]
    assert "Traceback" not in result.stderr
