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
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banyan_bus import Event, MessageBus
from tests.reliability import results

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
) -> None:
    """Publish ``numbers`` at ``rate`` per second, each until confirmed."""
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
                    bus.publish(ReliabilityTicked(run=run, n=n)), timeout=PUBLISH_TIMEOUT
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


@dataclass
class Outcome:
    lost: dict[str, list[int]]
    foreign: dict[str, list[int]]
    duplicates: dict[str, int]
    recovery: list[float | None]
    longest_pause: dict[str, float] = field(default_factory=dict)
    fault_pauses: list[float | None] = field(default_factory=list)  # that pause's length

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
    return Outcome(lost, foreign, dups, recovery, pauses, fault_pauses)


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
        "handled by a group not meant to get it": sum(len(v) for v in outcome.foreign.values()),
        "recovery after each fault (s)": fmt_recovery(outcome.recovery, outcome.fault_pauses),
        "longest pause in handling over the run (s, per group)": outcome.longest_pause,
        "duration (s)": f"{seconds:.1f}",
    }


def assert_outcome(outcome: Outcome, what: str) -> None:
    assert outcome.lost_total == 0, f"{what}: confirmed events lost: {outcome.lost}"
    assert not any(outcome.foreign.values()), f"{what}: foreign/misrouted: {outcome.foreign}"


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
