"""The "subscriptions per process" curve: start-up time and RSS against subscriptions.

One service with N handlers of N distinct event types (``Item0Created`` …), each
type its own subscription in the service's own group (the default group): the
realistic case of a service that grows handlers. Each point runs in a fresh
process, so its RSS is its own:

1. import banyan_bus, read RSS; define the N contracts and ``bus.subscribe`` one
   handler to each (all before ``start``, as a service does); read RSS;
2. time ``await bus.start()`` (connect, declare every exchange, queue and
   binding, start one consumer per queue); read RSS;
3. check it: publish one event of every type and wait until each was handled
   exactly once (no handler twice, none missing); on RabbitMQ also check that
   every subscription's queue and dead-letter queue exist and the queue has
   its consumer; then time ``await bus.stop()``.

RabbitMQ points get a vhost of their own (``vhosts.py``), created before and
deleted after the point whatever happened, so nothing is left on the broker.

::

    python benchmarks/curve_subscriptions.py            # memory 10..10,000, RabbitMQ 10..1,000
    python benchmarks/curve_subscriptions.py --quick    # memory 10..1,000, RabbitMQ 10..100
    python benchmarks/curve_subscriptions.py --no-rabbitmq

``benchmarks/curves.py`` imports :func:`measure`. The broker is ``BENCH_AMQP_URL``
(default ``amqp://guest:guest@127.0.0.1:5672/``), its management API
``BENCH_MANAGEMENT_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, os.environ.get("BENCH_BANYAN_SRC") or str(HERE.parent))

import vhosts  # noqa: E402

TITLE = "subscriptions per process"
RESULT_MARK = "CURVE_RESULT "
SERVICE = "curve-subs"
FULL = {"memory": (10, 100, 1_000, 10_000), "rabbitmq": (10, 100, 1_000)}
QUICK = {"memory": (10, 100, 1_000), "rabbitmq": (10, 100)}
POINT_TIMEOUT_S = 900.0
HANDLED_TIMEOUT_S = 120.0


def rss_bytes() -> int:
    """This process's resident set now (not its peak), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- one point, in its own process ---------------------------------------------------------


async def point(transport: str, n: int, url: str, sample: int | None = None) -> dict[str, Any]:
    from banyan_bus import Event, MessageBus
    from banyan_bus.transport.memory import drop_broker

    rss_imported = rss_bytes()
    contracts = [
        type(f"Item{i}Created", (Event,), {"__annotations__": {"seq": int}, "__module__": "curve"})
        for i in range(n)
    ]
    # Every type is published once, or (``sample``) every k-th type.
    checked = contracts[:: max(1, n // sample)] if sample else contracts
    handled: dict[str, int] = {}
    all_handled = asyncio.Event()

    async def handle(event: Event) -> None:
        key = event.__message_type__
        handled[key] = handled.get(key, 0) + 1
        if len(handled) == len(checked):
            all_handled.set()

    bus = MessageBus(SERVICE, url=url)
    for contract in contracts:
        await bus.subscribe(contract, handle)
    declarations = len(bus.topology())
    rss_before = rss_bytes()

    began = time.perf_counter()
    cpu = time.process_time()
    await bus.start()
    start_s = time.perf_counter() - began
    start_cpu_s = time.process_time() - cpu
    rss_after = rss_bytes()
    try:
        if transport == "rabbitmq":
            for sub in bus.subscriptions:
                for queue in (*sub.queue_names, sub.dlq_name):
                    state = await bus.transport.queue_state(queue)
                    assert state is not None, f"queue {queue} was not declared"
                    want = 1 if queue != sub.dlq_name else 0
                    assert state.consumers == want, f"{queue}: {state.consumers} consumers"
        window = 200
        for first in range(0, len(checked), window):
            batch = checked[first : first + window]
            await asyncio.gather(*(bus.publish(c(seq=i)) for i, c in enumerate(batch, first)))
        try:
            await asyncio.wait_for(all_handled.wait(), HANDLED_TIMEOUT_S)
        except TimeoutError:
            missing = len(checked) - len(handled)
            raise AssertionError(f"{missing} of {len(checked)} types were never handled") from None
        await bus.wait_idle(10)
        await asyncio.sleep(0.2)  # a duplicate would arrive about now
        twice = {k: v for k, v in handled.items() if v != 1}
        assert len(handled) == len(checked), f"{len(handled)} types handled, {len(checked)} sent"
        assert not twice, f"handled more than once: {dict(list(twice.items())[:5])}"
    finally:
        began = time.perf_counter()
        await bus.stop()
        stop_s = time.perf_counter() - began
        if transport == "memory":
            drop_broker(url)
    mib = 1024 * 1024
    return {
        "transport": transport,
        "subscriptions": n,
        "start_s": round(start_s, 4),
        "start_cpu_s": round(start_cpu_s, 4),
        "ms_per_subscription": round(start_s * 1000 / n, 4),
        "stop_s": round(stop_s, 4),
        "declarations": declarations,
        "rss_mib": round(rss_after / mib, 1),
        "start_rss_mib": round((rss_after - rss_before) / mib, 2),
        "rss_kib_per_subscription": round((rss_after - rss_imported) / 1024 / n, 1),
        "checked": len(handled),
    }


# -- the curve: one process per point ------------------------------------------------------


def _vhost_url(base: str, vhost: str) -> str:
    return urlunsplit(urlsplit(base)._replace(path="/" + quote(vhost, safe="")))


def run_point(
    transport: str, n: int, base_url: str | None, sample: int | None = None
) -> dict[str, Any]:
    """Run one point in a fresh process; raises AssertionError if it failed its checks."""
    vhost = None
    if transport == "rabbitmq":
        assert base_url, "a RabbitMQ point needs the broker's URL"
        vhost = f"curve-subs-{n}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        vhosts.create_vhost(vhost)
        url = _vhost_url(base_url, vhost)
    else:
        url = f"memory://curve-subs-{n}"
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--point", transport, str(n), "--url", url]
            + (["--sample", str(sample)] if sample else []),
            capture_output=True,
            text=True,
            timeout=POINT_TIMEOUT_S,
        )
    finally:
        if vhost is not None:
            vhosts.delete_vhost(vhost)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            if result.get("ok") is False:
                raise AssertionError(f"{transport} x {n}: {result['error']}")
            return result
    raise PointCrashed(
        f"{transport} x {n}: the point's process exited {proc.returncode} without a result:\n"
        f"{proc.stderr[-3000:]}"
    )


class PointCrashed(RuntimeError):
    """A point's process died without a result (the broker went away, say): not a check."""


def run_point_retried(
    transport: str, n: int, base_url: str | None, sample: int | None = None
) -> dict[str, Any]:
    """``run_point``; a RabbitMQ point that crashed (not one that failed a check) runs
    once more: a shared broker restarted by another suite is not a result."""
    try:
        return run_point(transport, n, base_url, sample)
    except (PointCrashed, vhosts.BrokerAdminError) as exc:
        if transport != "rabbitmq":
            raise
        print(f"{transport} x {n} crashed, measuring again: {exc}", file=sys.stderr)
        time.sleep(5)
        return run_point(transport, n, base_url, sample)


def measure(url: str, quick: bool) -> dict[str, Any]:
    """The curve's points (see the module docstring); AssertionError on a failed check.

    ``url`` is the RabbitMQ base URL (each point gets its own vhost on that broker);
    empty: memory:// points only.
    """
    sizes = QUICK if quick else FULL
    rows = [run_point_retried("memory", n, None) for n in sizes["memory"]]
    if url:
        rows += [run_point_retried("rabbitmq", n, url) for n in sizes["rabbitmq"]]
    return {
        "key": "subscriptions",
        "title": TITLE,
        "x": "subscriptions",
        "plots": [
            {"y": "start_s", "series": "transport", "logx": True, "logy": True},
            {"y": "ms_per_subscription", "series": "transport", "logx": True},
            {"y": "rss_mib", "series": "transport", "logx": True},
        ],
        "rows": rows,
    }


COLUMNS = (
    ("transport", "transport", "{}"),
    ("subscriptions", "subscriptions", "{:,}"),
    ("declarations", "declarations", "{:,}"),
    ("start_s", "start s", "{:.3f}"),
    ("ms_per_subscription", "ms/sub", "{:.3f}"),
    ("start_cpu_s", "start CPU s", "{:.3f}"),
    ("stop_s", "stop s", "{:.3f}"),
    ("rss_mib", "RSS MiB", "{:.1f}"),
    ("start_rss_mib", "start +MiB", "{:.1f}"),
    ("rss_kib_per_subscription", "KiB/sub", "{:.1f}"),
    ("checked", "checked", "{:,}"),
)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI sizes (about 20 s)")
    p.add_argument("--no-rabbitmq", action="store_true", help="memory:// points only")
    p.add_argument("--only", choices=("memory", "rabbitmq"), help="one transport's points")
    p.add_argument("--n", type=int, action="append", help="these sizes instead")
    p.add_argument("--json", action="store_true", help="print the measure() result as JSON")
    p.add_argument("--sample", type=int, help="publish about this many types, not all")
    p.add_argument("--point", nargs=2, metavar=("TRANSPORT", "N"), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        try:
            result = asyncio.run(point(args.point[0], int(args.point[1]), args.url, args.sample))
        except AssertionError as exc:
            print(RESULT_MARK + json.dumps({"ok": False, "error": str(exc)}), flush=True)
            return 1
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    base = "" if args.no_rabbitmq else vhosts.amqp_base_url()
    if args.n or args.only or args.sample:
        sizes = QUICK if args.quick else FULL
        rows = [
            run_point_retried(transport, n, base, args.sample)
            for transport in ("memory", "rabbitmq")
            if (args.only in (None, transport)) and (transport == "memory" or base)
            for n in (args.n or sizes[transport])
        ]
        result = {"rows": rows}
    else:
        result = measure(base, args.quick)
    print(json.dumps(result, indent=1) if args.json else table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
