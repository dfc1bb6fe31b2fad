"""Shared pieces of the reliability suite: the numbered event, a confirming publisher that
retries until each number is confirmed, per-group recorders, the loss/duplicate analysis
and the results writer (to the ignored ``reports/``; ``results.py`` commits them).

Ids are the event's ``n`` (0..N-1). ``confirmed`` holds only numbers whose publish returned
(the broker confirmed it); a publish that raised is retried with the same number, so a
number may be delivered twice (reported as a duplicate, never as a loss).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banyan_bus import Event, MessageBus
from tests.reliability import results

REPO = Path(__file__).resolve().parents[2]
PUBLISH_TIMEOUT = 15.0  # one publish attempt (a confirm that never comes counts as failed)
NUMBER_DEADLINE = 120.0  # give up (fail) if one number cannot be confirmed for this long
PAUSE_STARTS_WITHIN = 5.0  # a fault's pause in handling starts within this many s of it


class ReliabilityTicked(Event):
    run: str
    n: int


class ReliabilityBystanderPinged(Event):
    """Another contract: the bystander group subscribes to it and must see no tick."""

    run: str


@dataclass
class PublishStats:
    attempted: set[int] = field(default_factory=set)
    confirmed: set[int] = field(default_factory=set)
    confirmed_at: dict[int, float] = field(default_factory=dict)  # n -> wall clock
    failures: Counter[str] = field(default_factory=Counter)  # exception type -> count

    @property
    def retries(self) -> int:
        return sum(self.failures.values())


async def publish_numbered(
    bus: MessageBus,
    run: str,
    numbers: range,
    stats: PublishStats,
    *,
    rate: float,
    key: Callable[[int], str] | None = None,
    message_id: Callable[[int], str] | None = None,
) -> None:
    """Publish ``numbers`` at ``rate`` per second, each until confirmed, one after another
    (so per partition ``key`` in number order). ``message_id``: the same id for every
    attempt of a number (an idempotent consumer then sees a publisher's retry as the
    duplicate it is); by default each attempt gets a new id."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, n in enumerate(numbers):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        stats.attempted.add(n)
        first_try = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(
                    bus.publish(
                        ReliabilityTicked(run=run, n=n),
                        partition_key=None if key is None else key(n),
                        message_id=None if message_id is None else message_id(n),
                    ),
                    timeout=PUBLISH_TIMEOUT,
                )
            except Exception as exc:  # any failure: not confirmed, try again
                stats.failures[type(exc).__name__] += 1
                if time.monotonic() - first_try > NUMBER_DEADLINE:
                    raise AssertionError(
                        f"event {n} could not be published for {NUMBER_DEADLINE:.0f} s: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                await asyncio.sleep(0.1)
                continue
            stats.confirmed.add(n)
            stats.confirmed_at[n] = time.time()
            break


@dataclass
class Recorder:
    """What each group handled: ``(n, wall-clock time)`` per handled call."""

    run: str
    handled: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def handler(self, group: str) -> Any:
        log = self.handled.setdefault(group, [])
        run = self.run

        async def handle(event: ReliabilityTicked) -> None:
            if event.run == run:
                log.append((event.n, time.time()))

        handle.__name__ = f"record_{group.replace('-', '_')}"
        return handle

    def ids(self, group: str) -> list[int]:
        return [n for n, _ in self.handled.get(group, [])]

    def distinct(self, group: str) -> int:
        return len(set(self.ids(group)))


def read_handled_file(path: Path) -> list[tuple[int, float]]:
    """Lines ``"<n> <time>"`` written by a consumer subprocess (a torn last line is ignored)."""
    out: list[tuple[int, float]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out.append((int(parts[0]), float(parts[1])))
            except ValueError:
                continue
    return out


@dataclass(frozen=True)
class DupBound:
    """The most duplicates (per group) the faults of a scenario can cause.

    A delivery is handled twice only if the broker redelivers it after it was handled:
    it was unacked when its consumer's channel died. A consumer holds at most
    ``in_flight`` unacked deliveries (its prefetch, per consumed queue), so each fault
    that hits ``consumers`` consumers adds at most ``in_flight x consumers``. A publish
    attempt that failed may still have reached the queue before the retry with the same
    number: at most one more copy per failed attempt. No fault touching the consumer and
    no failed publish: zero.
    """

    in_flight: int = 0
    consumers: int = 1
    faults: int = 0
    publish_retries: int = 0
    extra: int = 0  # a scenario's own, explained by ``note``
    note: str = ""

    @property
    def value(self) -> int:
        return self.in_flight * self.consumers * self.faults + self.publish_retries + self.extra

    def __str__(self) -> str:
        text = (
            f"{self.value} (= {self.in_flight} unacked per consumer x {self.consumers} "
            f"consumer(s) x {self.faults} fault(s) + {self.publish_retries} failed publishes"
        )
        if self.note:
            text += f" + {self.extra} {self.note}"
        return text + ")"


@dataclass
class Outcome:
    lost: dict[str, list[int]]
    foreign: dict[str, list[int]]
    duplicates: dict[str, int]
    recovery: list[float | None]
    longest_pause: dict[str, float] = field(default_factory=dict)
    fault_pauses: list[float | None] = field(default_factory=list)  # that pause's length
    bound: DupBound = field(default_factory=DupBound)

    @property
    def over_bound(self) -> dict[str, int]:
        """Groups with more duplicates than the bound allows."""
        return {g: d for g, d in self.duplicates.items() if d > self.bound.value}

    @property
    def lost_total(self) -> int:
        return sum(len(v) for v in self.lost.values())

    @property
    def duplicates_total(self) -> int:
        return sum(self.duplicates.values())


def analyse(
    stats: PublishStats,
    handled: dict[str, list[tuple[int, float]]],
    *,
    groups: list[str],
    bound: DupBound,
    bystanders: dict[str, int] | None = None,
    faults: list[float] | None = None,
) -> Outcome:
    """Lost (confirmed but never handled), foreign (not published in this run, or handled by a
    bystander), duplicates; recovery after each fault = for each group, the end of the longest
    pause in its handling that began within PAUSE_STARTS_WITHIN s of the fault (before the
    next fault or 60 s), minus the fault time; the slowest group counts. ``None``: a group
    handled nothing after the fault."""
    lost: dict[str, list[int]] = {}
    foreign: dict[str, list[int]] = {}
    dups: dict[str, int] = {}
    for group in groups:
        ids = [n for n, _ in handled.get(group, [])]
        seen = set(ids)
        lost[group] = sorted(stats.confirmed - seen)
        foreign[group] = sorted(seen - stats.attempted)
        dups[group] = len(ids) - len(seen)
    for group, count in (bystanders or {}).items():
        foreign[group] = list(range(count))
    recovery: list[float | None] = []
    fault_pauses: list[float | None] = []
    fault_times = list(faults or [])
    for i, t in enumerate(fault_times):
        end = fault_times[i + 1] if i + 1 < len(fault_times) else t + 60.0
        per_group: list[float] = []
        group_pauses: list[float] = []
        for group in groups:
            times = sorted(ht for _, ht in handled.get(group, []) if t - 0.5 <= ht < end)
            if not times:
                break
            # The pause the fault caused starts just before or shortly after it; a longer
            # jitter gap later in the window is not it.
            gaps = [
                (b - a, b)
                for a, b in itertools.pairwise(times)
                if b > t and a <= t + PAUSE_STARTS_WITHIN
            ]
            if not gaps:
                per_group.append(0.0)
                group_pauses.append(0.0)
                continue
            gap, resumed = max(gaps)
            per_group.append(max(0.0, resumed - t))
            group_pauses.append(gap)
        recovery.append(max(per_group) if len(per_group) == len(groups) else None)
        fault_pauses.append(max(group_pauses) if len(per_group) == len(groups) else None)
    pauses: dict[str, float] = {}
    for group in groups:
        times = sorted(ht for _, ht in handled.get(group, []) if ht > 0)
        pauses[group] = round(max((b - a for a, b in itertools.pairwise(times)), default=0.0), 2)
    return Outcome(lost, foreign, dups, recovery, pauses, fault_pauses, bound)


def fmt_recovery(values: list[float | None], pauses: list[float | None]) -> str:
    if not values:
        return "-"
    return ", ".join(
        "none after" if v is None or p is None else f"{v:.2f} (pause {p:.2f})"
        for v, p in zip(values, pauses, strict=True)
    )


def write_results(scenario: str, title: str, rows: dict[str, Any], notes: str = "") -> None:
    """Replace (or add) ``scenario``'s table in ``reports/reliability/RESULTS.md``.

    Never the committed ``tests/reliability/RESULTS.md``: a test run leaves the
    checkout clean; ``python -m tests.reliability.results --commit`` updates it.
    """
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    lines = [
        f"<!-- scenario:{scenario} -->",
        f"### {title}",
        "",
        f"Run {stamp}.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows.items()),
    ]
    if notes:
        lines += ["", notes]
    lines.append(f"<!-- /scenario:{scenario} -->")
    results.record(scenario, "\n".join(lines))


def verdict(outcome: Outcome, extra_failures: list[str] | None = None) -> str:
    problems = list(extra_failures or [])
    if outcome.lost_total:
        problems.append(f"{outcome.lost_total} lost")
    if any(outcome.foreign.values()):
        problems.append("handled by a group not meant to get it")
    if outcome.over_bound:
        problems.append(f"duplicates {outcome.over_bound} over the bound {outcome.bound.value}")
    return "PASS" if not problems else "FAIL: " + "; ".join(problems)


def common_rows(
    stats: PublishStats, outcome: Outcome, faults: int, seconds: float
) -> dict[str, Any]:
    return {
        "events published (confirmed)": len(stats.confirmed),
        "publish attempts that failed (retried)": (
            f"{stats.retries} {dict(stats.failures)}" if stats.retries else "0"
        ),
        "faults injected": faults,
        "lost": f"{outcome.lost_total} { ({g: v[:10] for g, v in outcome.lost.items() if v}) }"
        if outcome.lost_total
        else "0",
        "duplicates (per group)": f"{outcome.duplicates_total} {outcome.duplicates}",
        "duplicate bound (per group)": str(outcome.bound),
        "handled by a group not meant to get it": sum(len(v) for v in outcome.foreign.values()),
        "recovery after each fault (s)": fmt_recovery(outcome.recovery, outcome.fault_pauses),
        "longest pause in handling over the run (s, per group)": outcome.longest_pause,
        "duration (s)": f"{seconds:.1f}",
    }


def assert_outcome(outcome: Outcome, what: str) -> None:
    assert outcome.lost_total == 0, f"{what}: confirmed events lost: {outcome.lost}"
    assert not any(outcome.foreign.values()), f"{what}: foreign/misrouted: {outcome.foreign}"
    assert not outcome.over_bound, (
        f"{what}: duplicates {outcome.duplicates} over the bound {outcome.bound}"
    )


def rss_kib(pid: int | None = None) -> int:
    """Resident set size of process ``pid`` (this one by default), KiB."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


RSS_ROW = "RSS start / end (MiB)"


def fmt_rss(start_kib: int, end_kib: int, whose: str = "test process") -> str:
    return f"{start_kib / 1024:.1f} / {end_kib / 1024:.1f} ({whose})"


@dataclass
class Order:
    """Per partition key, the handled numbers checked against the key's publish order.

    Each handling must be the key's next event (one position on) or a replay after a
    fault: a rewind to an event already handled, from which handling goes on one
    position at a time again. A step forward past an unhandled (or unreplayed) event
    of the key, or a first handling that overtakes an earlier event, is a violation.
    """

    keys: int
    events: int
    rewinds: int
    violations: list[str]


def check_order(
    records: list[tuple[int, float]], key: Callable[[int], str], published: set[int]
) -> Order:
    per_key: dict[str, list[int]] = {}
    for n in sorted(published):
        per_key.setdefault(key(n), []).append(n)
    position = {n: i for ns in per_key.values() for i, n in enumerate(ns)}
    handled: dict[str, list[int]] = {}
    for n, _ in sorted(records, key=lambda r: r[1]):
        handled.setdefault(key(n), []).append(n)
    rewinds = 0
    violations: list[str] = []
    for k, ns in handled.items():
        current, furthest = -1, -1
        for n in ns:
            pos = position.get(n)
            if pos is None:
                violations.append(f"key {k}: {n} was never published")
                continue
            if pos == current + 1 and pos <= furthest + 1:
                pass
            elif pos <= current:
                rewinds += 1
            else:
                violations.append(
                    f"key {k}: {n} (position {pos}) handled after position {current}"
                    f" (furthest {furthest}): {ns[:40]}"
                )
            current = pos
            furthest = max(furthest, pos)
    return Order(len(handled), len(records), rewinds, violations)


async def wait_all_handled(
    stats: PublishStats,
    handled: Any,
    groups: list[str],
    *,
    timeout: float,
) -> bool:
    """Wait until every confirmed id was handled by every group; False on timeout.

    ``handled`` is a callable giving the current ``{group: [(n, t), ...]}``.
    """
    deadline = time.monotonic() + timeout
    while True:
        current = handled()
        if all(stats.confirmed <= {n for n, _ in current.get(g, [])} for g in groups):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)


class ConsumerProc:
    """``tests/reliability/consumer_proc.py`` as a subprocess; its files under ``tmp``."""

    def __init__(self, tmp: Path, url: str, group: str, run: str, tag: str, **opts: object):
        self.out = tmp / f"handled-{tag}.txt"
        self.starts = tmp / f"started-{tag}.txt"
        self.ready = tmp / f"ready-{tag}"
        self.log = tmp / f"consumer-{tag}.log"
        cmd = [
            sys.executable,
            "-u",  # unbuffered: the log of a SIGKILLed consumer is complete
            "-m",
            "tests.reliability.consumer_proc",
            "--url",
            url,
            "--group",
            group,
            "--run",
            run,
            "--out",
            str(self.out),
            "--starts",
            str(self.starts),
            "--ready",
            str(self.ready),
        ]
        for name, value in opts.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value is not None and value is not False:
                cmd += [flag, str(value)]
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.killed_at: float | None = None

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"consumer exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"consumer not ready in {timeout} s: {self.tail()}")
            await asyncio.sleep(0.1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def handled(self) -> list[tuple[int, float]]:
        return read_handled_file(self.out)

    def started(self) -> list[tuple[int, float]]:
        return read_handled_file(self.starts)

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.killed_at = time.time()
        self.proc.wait(timeout=10)
        self._log_file.close()

    async def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if self.proc.poll() is None:
            self.kill()
        self._log_file.close()


def unfinished(proc: ConsumerProc, since: float = 0.0) -> list[int]:
    """Numbers ``proc``'s handler started (at or after ``since``, wall clock: a handler
    cancelled by an earlier fault is not counted) and did not finish."""
    left = Counter(n for n, t in proc.started() if t >= since)
    left.subtract(Counter(n for n, _ in proc.handled()))
    return sorted(n for n, c in left.items() for _ in range(max(c, 0)))
