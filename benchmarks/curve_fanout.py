"""Cost curve: fan-out. One publisher, 1 / 10 / 100 subscribing groups with one consumer
each: every event is copied to every group's queue, and every copy is handled once.

Two modes:

* **one process**: the publisher's bus and one consumer bus holding every group's
  subscription (one connection, a consumer per group) in the measuring process;
* **a process per group**: the publisher in the measuring process, the groups'
  consumers in processes of their own (this module run as ``_consume``), at most
  ``MAX_PROCS`` (10) of them: 1 and 10 groups get a process each, 100 groups get 10
  processes of 10 groups each (100 Python processes on this 2-core machine would
  measure the scheduler more than the bus; the row's ``procs`` counts the consumer
  processes and the publisher's). ``--quick`` caps them at 3.

Reported: the publish rate (N events, confirmed, ``WINDOW`` in flight, first publish to
last confirm), the delivery rate (N x groups copies / time from the first publish until
the last copy is handled), and the client CPU per copy (the publisher's and every
consumer's process CPU over that time). Checked: every id handled exactly once in
every group, every group's queue and dead-letter queue empty afterwards.

Run alone: ``python benchmarks/curves.py --only fanout [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from functools import partial
from typing import Any

import curves

from banyan_bus import Event, MessageBus

TITLE = "fan-out: one publisher, N subscribing groups"
GROUPS = (1, 10, 100)
#: --quick (CI) stops at 10 groups: deleting a vhost that holds 100 groups' quorum queues
#: (and their DLQs) twice in a row was seen to wedge vhost operations on a busy RabbitMQ
#: 3.10 broker (add_vhost hanging until stop_app/start_app), which would fail every later
#: test of the run. The full curve keeps 100.
QUICK_GROUPS = (1, 10)
MAX_PROCS = 10
QUICK_MAX_PROCS = 3  # --quick: start-up of many processes would dominate a CI run
WINDOW = 500
PREFETCH = 100  # per group; concurrency = prefetch, as in benchmarks workload 3
ONE = "one process"
MARK = "FANOUT "  # the children's protocol lines on stdout


class FanoutTickEmitted(Event):
    seq: int


def events_for(groups: int, quick: bool) -> int:
    """Events per point: fewer as groups grow, so copies stay ≲ 100,000 (quick: 2,000)."""
    if quick:
        return max(20, min(500, 2000 // groups))
    return max(1000, min(20000, 100_000 // groups))


def group_names(groups: int) -> list[str]:
    return [f"fanout-g{i:03d}" for i in range(groups)]


def handler(seen: curves.Seen) -> Any:
    async def handle(event: FanoutTickEmitted) -> None:
        seen.hit(event.seq)

    return handle


async def consumer_bus(url: str, groups: list[str], seens: dict[str, curves.Seen]) -> MessageBus:
    bus = MessageBus("fanout-consumer", url)
    for group in groups:
        await bus.subscribe(
            FanoutTickEmitted,
            handler(seens[group]),
            subscription_group=group,
            concurrency=PREFETCH,
            prefetch=PREFETCH,
        )
    return bus


async def publish_all(url: str, n: int) -> tuple[float, float, float, float]:
    """Publish ids 0..n-1 from a bus of its own: (t0, t1, cpu0, cpu1)."""
    publisher = MessageBus("fanout-publisher", url)
    async with publisher:
        events = [FanoutTickEmitted(seq=i) for i in range(n)]
        cpu0, t0 = time.process_time(), time.monotonic()
        await curves.pipeline(n, WINDOW, lambda i: publisher.publish(events[i]))
        return t0, time.monotonic(), cpu0, time.process_time()


def summarize(
    n: int, groups: int, t0: float, t1: float, t_last: float, cpu: float, procs: int
) -> dict[str, Any]:
    copies = n * groups
    return {
        "procs": procs,
        "events": n,
        "copies": copies,
        "publish_msgs_s": n / (t1 - t0),
        "delivered_msgs_s": copies / (t_last - t0),
        "cpu_us_per_copy": cpu / copies * 1e6,
        "last_copy_after_publish_s": t_last - t1,
    }


async def one_process(base_url: str, groups: int, n: int) -> dict[str, Any]:
    async with curves.point_vhost(base_url, f"fanout-{groups}") as url:
        names = group_names(groups)
        seens = {g: curves.Seen(n) for g in names}
        consumer = await consumer_bus(url, names, seens)
        async with consumer:
            t0, t1, cpu0, _ = await publish_all(url, n)
            await curves.wait_all(seens.values(), 60 + n * groups / 500, f"{groups} groups")
            cpu1 = time.process_time()
        for g, seen in seens.items():
            seen.check(f"group {g}")
        await curves.expect_empty(
            url, curves.queue_names(consumer, exclude_prefix=curves.DELAY_LEVEL_PREFIX)
        )
        t_last = max(s.t_last for s in seens.values())
        return summarize(n, groups, t0, t1, t_last, cpu1 - cpu0, 1)


class Child:
    """One ``_consume`` process, talking line by line on its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.ready = asyncio.Event()
        self.done = asyncio.Event()
        self.report: dict[str, Any] = {}
        self.final: dict[str, Any] = {}
        self.infra = ""  # set when the process could not reach the broker
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().strip()
            if not line.startswith(MARK):
                continue
            kind, _, body = line[len(MARK) :].partition(" ")
            if kind == "INFRA":
                self.infra = body
            elif kind == "READY":
                self.ready.set()
            elif kind == "DONE":
                self.report = json.loads(body)
                self.done.set()
            elif kind == "RESULT":
                self.final = json.loads(body)

    async def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        await self.proc.stdin.drain()


async def separate_processes(base_url: str, groups: int, n: int, max_procs: int) -> dict[str, Any]:
    async with curves.point_vhost(base_url, f"fanout-procs-{groups}") as url:
        names = group_names(groups)
        procs = min(groups, max_procs)
        chunks = [names[i::procs] for i in range(procs)]
        children: list[Child] = []
        try:
            for chunk in chunks:
                cmd = [sys.executable, __file__, "_consume", "--url", url, "--n", str(n)]
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    "--groups",
                    ",".join(chunk),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                children.append(Child(proc))
            await _all(children, "ready", 120, "consumer processes started")
            t0, t1, cpu0, cpu1 = await publish_all(url, n)
            await _all(children, "done", 60 + n * groups / 500, "every copy handled")
            for child in children:
                await child.say("stop")
            async with asyncio.timeout(60):
                codes = [await c.proc.wait() for c in children]
                await asyncio.gather(*(c.task for c in children))
        finally:
            for c in children:
                if c.proc.returncode is None:
                    c.proc.kill()
                    await c.proc.wait()
        curves.check(codes == [0] * procs, f"consumer processes exited {codes}")
        handled: dict[str, int] = {}
        for c in children:
            curves.check(not c.report["errors"], f"consumer errors: {c.report['errors'][:3]}")
            handled.update(c.report["counts"])
        short = {g: handled.get(g, 0) for g in names if handled.get(g) != n}
        curves.check(not short, f"groups that did not handle all {n}: {short}")
        queues = [c.final.get("queues", []) for c in children]
        await curves.expect_empty(url, [q for qs in queues for q in qs])
        t_last = max(c.report["t_last"] for c in children)
        cpu = (cpu1 - cpu0) + sum(c.report["cpu"] for c in children)
        row = summarize(n, groups, t0, t1, t_last, cpu, procs + 1)
        row["rss_mb_per_consumer_proc"] = max(c.final.get("max_rss_mb", 0) for c in children)
        return row


async def _all(children: list[Child], what: str, timeout: float, label: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            waits = [asyncio.create_task(getattr(c, what).wait()) for c in children]
            exits = [asyncio.create_task(c.proc.wait()) for c in children]
            pending = set(waits)
            while pending:
                finished, _ = await asyncio.wait(
                    [*pending, *exits], return_when=asyncio.FIRST_COMPLETED
                )
                if any(e in finished for e in exits):
                    codes = [c.proc.returncode for c in children]
                    await asyncio.gather(
                        *(c.task for c in children if c.proc.returncode is not None)
                    )
                    infra = [c.infra for c in children if c.infra]
                    if infra:
                        raise curves.BrokerTrouble(f"{label}: {infra[0]}")
                    raise AssertionError(f"{label}: a consumer process exited early {codes}")
                pending -= finished
            for e in exits:
                e.cancel()
    except TimeoutError:
        got = sum(getattr(c, what).is_set() for c in children)
        raise AssertionError(f"{label}: {got} of {len(children)} within {timeout:.0f} s") from None


async def consume_main(args: argparse.Namespace) -> int:
    """A consumer process: its groups' subscriptions on one bus; reports READY once
    consuming, DONE when every group handled all n, RESULT after stopping on 'stop'."""
    curves.quiet_logs()
    names = args.groups.split(",")
    seens = {g: curves.Seen(args.n) for g in names}
    bus = await consumer_bus(args.url, names, seens)
    loop = asyncio.get_running_loop()
    async with bus:
        cpu_ready = time.process_time()
        print(f"{MARK}READY", flush=True)
        await asyncio.gather(*(s.done.wait() for s in seens.values()))
        cpu_done = time.process_time()
        report = {
            "counts": {g: s.count for g, s in seens.items()},
            "errors": [e for s in seens.values() for e in s.errors][:10],
            "t_last": max(s.t_last for s in seens.values()),
            "cpu": cpu_done - cpu_ready,
        }
        print(f"{MARK}DONE {json.dumps(report)}", flush=True)
        word = await loop.run_in_executor(None, sys.stdin.readline)
        if word.strip() != "stop":
            return 1
    final = {
        "queues": curves.queue_names(bus, exclude_prefix=curves.DELAY_LEVEL_PREFIX),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"{MARK}RESULT {json.dumps(final)}", flush=True)
    return 0


async def measure_async(url: str, quick: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    max_procs = QUICK_MAX_PROCS if quick else MAX_PROCS
    split = f"a process per group (at most {max_procs})"
    for groups in QUICK_GROUPS if quick else GROUPS:
        n = events_for(groups, quick)
        await curves.run_point(
            rows, {"mode": ONE, "groups": groups}, partial(one_process, url, groups, n)
        )
        await curves.run_point(
            rows,
            {"mode": split, "groups": groups},
            partial(separate_processes, url, groups, n, max_procs),
        )
    return {
        "key": "fanout",
        "title": TITLE,
        "x": "groups",
        "xlabel": "subscribing groups (one consumer each, log scale)",
        "plots": [
            {
                "y": "publish_msgs_s",
                "series": "mode",
                "logx": True,
                "label": "publish rate (events/s, confirmed)",
            },
            {
                "y": "delivered_msgs_s",
                "series": "mode",
                "logx": True,
                "label": "copies handled per second (events x groups / s)",
            },
            {
                "y": "cpu_us_per_copy",
                "series": "mode",
                "logx": True,
                "label": "client CPU per copy handled (µs)",
            },
        ],
        "rows": rows,
    }


def measure(url: str, quick: bool) -> dict[str, Any]:
    return curves.finish(asyncio.run(measure_async(url, quick)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="a fan-out consumer process (curves.py starts it)")
    p.add_argument("role", choices=("_consume",))
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--groups", required=True, help="comma-separated subscription groups")
    try:
        sys.exit(asyncio.run(consume_main(p.parse_args())))
    except Exception as exc:
        if not curves.broker_trouble(exc):
            raise
        print(f"{MARK}INFRA {type(exc).__name__}: {exc}", flush=True)
        sys.exit(2)
