"""Cost curves: how banyan_bus's costs grow with fan-out, payload size, delays in flight,
ordered partitions and keys, and subscriptions, against the local RabbitMQ::

    python benchmarks/curves.py [--quick] [--only NAME] [--out DIR]

Each curve is a module ``curve_<name>.py`` beside this file with ``TITLE`` and
``measure(url, quick) -> dict`` (see ``CURVES``); every point runs on a vhost of its
own, deleted afterwards, and checks itself: every message id published once, handled
exactly once per group, nothing dead-lettered (a curve's ``measure`` raises
``AssertionError`` when a point fails). Printed: a table per curve. Written to DIR
(default ``benchmarks/results``): ``curves.json`` and a PNG per plot,
``curve-<key>-<y>.png``. Exits 1 if any curve failed.

This module is also the curves' kit (vhosts, counting, queue checks, pipelined
publishing, broker memory, tables, plots): the curve modules import it as ``curves``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# vhosts.py beside this file; banyan_bus from this checkout, or from the snapshot that
# --banyan-ref extracted (BENCH_BANYAN_SRC, which the curves' own processes inherit)
for _path in (str(HERE), os.environ.get("BENCH_BANYAN_SRC") or str(ROOT)):
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)
# Run as a script, this module is __main__; the curve modules' ``import curves`` gets it.
sys.modules.setdefault("curves", sys.modules[__name__])

import bench_env  # noqa: E402
import vhosts  # noqa: E402
from bench_env import BrokerWatch  # noqa: E402

CURVES = ("fanout", "payload", "delays", "ordered", "subscriptions")
"""Curve names, in run order: module ``curve_<name>``, result key ``<name>``."""

DEFAULT_OUT = HERE / "results"


# -- checks ---------------------------------------------------------------------------------


class CurveFailed(AssertionError):
    """A curve's points ran, and at least one failed its check; ``result`` holds every row
    (the failed ones with ``ok: False`` and their ``error``)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def check(condition: object, message: str) -> None:
    """``assert`` that survives ``python -O``: a failed check raises AssertionError."""
    if not condition:
        raise AssertionError(message)


def finish(result: dict[str, Any]) -> dict[str, Any]:
    """Return ``result`` if every row passed its check, else raise ``CurveFailed``."""
    bad = [r for r in result["rows"] if not r.get("ok")]
    if bad:
        first = bad[0].get("error", "?")
        raise CurveFailed(
            f"{len(bad)} of {len(result['rows'])} points failed; first: {first}", result
        )
    return result


ATTEMPTS = 5  # a point overlapping broker trouble is measured again, up to this many times
POINT_TIMEOUT_S = 600.0  # the longest full-size point takes ≈ 2 minutes, set-up included


async def run_point(
    rows: list[dict[str, Any]], head: dict[str, Any], body: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Measure one point: its row is ``head`` + what ``body()`` returns, with ``ok``.

    A failed check (AssertionError), a timeout or a crash makes the row ``ok: False``
    with the error, and the curve goes on with its other points (``finish`` then fails
    it). The broker here is shared, and other suites restart it or raise its alarms: a
    point that overlapped such trouble measured nothing valid and is measured again."""
    label = ", ".join(f"{k}={v}" for k, v in head.items())
    for attempt in range(ATTEMPTS):
        await asyncio.to_thread(WATCH.wait_settled)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(POINT_TIMEOUT_S):  # a broker gone mid-call can hang
                row = {**head, **(await body()), "ok": True}
        except (AssertionError, TimeoutError) as exc:
            row = {**head, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:
            where = traceback.format_exc(limit=-3).strip().splitlines()[-6:]
            row = {**head, "ok": False, "error": f"{type(exc).__name__}: {exc}", "where": where}
            if broker_trouble(exc):
                row["broker_trouble"] = True
        row["point_s"] = round(time.monotonic() - t0, 1)
        if WATCH.outage_between(t0, time.monotonic()) or row.get("broker_trouble"):
            row["broker_outage"] = True
            if attempt < ATTEMPTS - 1:
                print(f"  ({label}: the broker was down meanwhile; measured again)", flush=True)
                await asyncio.sleep(5)
                continue
        break
    if not row["ok"]:
        print(f"  !!! point FAILED ({label}): {row['error']}", file=sys.stderr, flush=True)
    rows.append(row)
    print(f"  {label}: {'ok' if row['ok'] else 'FAILED'} in {row['point_s']} s", flush=True)
    return row


class BrokerTrouble(ConnectionError):
    """The broker could not be reached or went away: nothing valid was measured."""


def broker_trouble(exc: BaseException) -> bool:
    """Whether ``exc`` says the broker was unreachable or went away (the point is measured
    again). A timeout here is a point's own wait (copies not handled in time): a failure."""
    return bench_env.broker_trouble(exc, timeouts=False)


WATCH = BrokerWatch(alarms=True, margin=1.0)


class Seen:
    """Counts message ids 0..n-1: each must arrive exactly once (a duplicate or a
    stranger is recorded as an error). ``done`` is set when all n arrived."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = bytearray(n)
        self.count = 0
        self.errors: list[str] = []
        self.done = asyncio.Event()
        self.t_first = self.t_last = 0.0
        self.cpu_first = self.cpu_last = 0.0  # process CPU time at the first and the last id
        if n == 0:
            self.done.set()

    def hit(self, i: int) -> None:
        now = time.monotonic()
        if not 0 <= i < self.n:
            self.errors.append(f"unexpected id {i}")
            return
        if self.seen[i]:
            self.errors.append(f"id {i} handled twice")
            return
        self.seen[i] = 1
        if self.count == 0:
            self.t_first, self.cpu_first = now, time.process_time()
        self.count += 1
        self.t_last = now
        if self.count == self.n:
            self.cpu_last = time.process_time()
            self.done.set()

    def check(self, what: str) -> None:
        check(not self.errors, f"{what}: {len(self.errors)} errors, first {self.errors[:3]}")
        check(self.count == self.n, f"{what}: {self.count} of {self.n} ids handled")


async def wait_all(seens: Iterable[Seen], timeout: float, what: str) -> None:
    seens = list(seens)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(s.done.wait() for s in seens))
    except TimeoutError:
        counts = sorted(s.count for s in seens)
        raise AssertionError(
            f"{what}: not all handled within {timeout:.0f} s "
            f"(handled per group, lowest first: {counts[:5]} of {seens[0].n})"
        ) from None


async def pipeline(n: int, window: int, publish: Callable[[int], Awaitable[Any]]) -> None:
    """``publish(i)`` for i in 0..n-1, in order, with at most ``window`` unconfirmed at a
    time (a new one starts as soon as one is confirmed). A failed publish fails the check."""
    slots = asyncio.Semaphore(window)
    errors: list[BaseException] = []
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        try:
            await publish(i)
        except Exception as exc:
            errors.append(exc)
        finally:
            slots.release()

    for i in range(n):
        await slots.acquire()
        if errors:
            break
        task = asyncio.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    check(not errors, f"{len(errors)} publishes failed, first: {errors[:1]!r}")


# -- the broker ------------------------------------------------------------------------------


def amqp_url() -> str:
    return vhosts.amqp_base_url()


VHOSTS_USED: list[str] = []  # every point's vhost, in curves.json (each must be gone)


@contextlib.asynccontextmanager
async def point_vhost(base_url: str, tag: str) -> AsyncIterator[str]:
    """A fresh vhost for one point (its AMQP URL), deleted afterwards whatever happened."""
    name = f"curve-{tag}-{uuid.uuid4().hex[:6]}"
    VHOSTS_USED.append(name)
    parts = urlsplit(base_url)
    try:  # a creation interrupted half-way is deleted too
        await asyncio.to_thread(vhosts.create_vhost, name)
        yield urlunsplit(parts._replace(path="/" + quote(name, safe="")))
    finally:
        await asyncio.shield(asyncio.to_thread(delete_vhost, name))


def delete_vhost(name: str) -> None:
    """Delete vhost ``name``; if the management API cannot (seen here: a quorum queue
    whose Raft server stopped answering holds the deletion, and every vhost operation
    after it, indefinitely), ``rabbitmqctl delete_vhost`` on a local broker force-deletes
    such queues."""
    try:
        vhosts.delete_vhost(name)
        return
    except vhosts.BrokerAdminError as exc:
        error = str(exc)
    ctl = shutil.which("rabbitmqctl")
    if ctl:
        try:
            done = subprocess.run(
                [ctl, "delete_vhost", name], capture_output=True, text=True, timeout=180
            )
            if done.returncode == 0:
                print(f"warning: vhost {name} deleted with rabbitmqctl ({error})", file=sys.stderr)
                return
            error += f"; rabbitmqctl: {done.stderr.strip()[-300:]}"
        except subprocess.TimeoutExpired:
            error += "; rabbitmqctl delete_vhost timed out"
    print(f"warning: vhost {name} left behind: {error}", file=sys.stderr)


def queue_names(bus: Any, *, exclude_prefix: str = "") -> list[str]:
    """Every queue ``bus`` declares (its groups' queues, DLQs, partition queues, delay
    levels), from its public ``topology()``; minus those named ``exclude_prefix...``."""
    from banyan_bus.declarations import QueueDecl

    names = [d.name for d in bus.topology() if isinstance(d, QueueDecl)]
    return [n for n in names if not (exclude_prefix and n.startswith(exclude_prefix))]


DELAY_LEVEL_PREFIX = "banyan.delay.level."


async def queue_depths(url: str, names: Iterable[str]) -> dict[str, int]:
    """Ready messages in each queue (passive declare: exact, unlike the management stats)."""
    import aiormq

    depths: dict[str, int] = {}
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        for name in names:
            try:
                ok = await channel.queue_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise AssertionError(f"queue {name} does not exist") from None
            depths[name] = int(ok.message_count or 0)
    finally:
        await conn.close()
    return depths


async def expect_empty(url: str, names: Iterable[str], *, wait: float = 10.0) -> None:
    """Every queue in ``names`` is empty: nothing left unhandled, nothing dead-lettered
    (acks may take a moment to reach the broker)."""
    names = list(names)
    deadline = time.monotonic() + wait
    while True:
        full = {q: d for q, d in (await queue_depths(url, names)).items() if d}
        if not full:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"messages left behind (queue: count): {full}")
        await asyncio.sleep(0.3)


def mgmt_get(path: str) -> Any:
    return vhosts._request("GET", path)


def broker_memory() -> dict[str, int]:
    """The broker node's memory breakdown, computed now (``/api/nodes/<node>/memory``):
    ``erlang`` (what the VM allocated for its own use), ``rss``, and the categories."""
    nodes = mgmt_get("/api/nodes?columns=name")
    node = nodes[0]["name"]
    memory = mgmt_get(f"/api/nodes/{quote(node, safe='')}/memory")["memory"]
    out = {k: int(v) for k, v in memory.items() if isinstance(v, int)}
    total = memory.get("total", {})
    out["erlang"] = int(total.get("erlang", 0))
    out["rss"] = int(total.get("rss", 0))
    return out


def quiet_logs() -> None:
    """banyan_bus logs warnings and errors only (on stderr), so tables stay readable."""
    from banyan_bus.logging import configure

    configure(json=False, level="WARNING")


# -- the runner: tables, plots, JSON ---------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if value is None:
        return "—"
    return str(value)


def table_columns(result: dict[str, Any]) -> list[str]:
    """The series, x, then every other scalar column in first-seen order (``ok`` last)."""
    series = {p.get("series") for p in result.get("plots", []) if p.get("series")}
    first = [*sorted(series), result.get("x", "")]
    cols = [c for c in first if c]
    for row in result.get("rows", []):
        for k, v in row.items():
            if (
                k not in cols
                and k not in ("ok", "error", "point_s")
                and not isinstance(v, (list, dict))
            ):
                cols.append(k)
    return [*cols, "ok"]


def print_table(result: dict[str, Any]) -> None:
    cols = table_columns(result)
    rows = [[fmt(row.get(c)) for c in cols] for row in result.get("rows", [])]
    title = f"{result.get('title', result.get('key'))}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a banyan_bus dependency
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
        return
    width = sum(max(len(c), *(len(r[i]) for r in rows)) + 3 for i, c in enumerate(cols)) + 1
    t = Table(title=title)
    for i, c in enumerate(cols):
        numeric = any(isinstance(row.get(c), (int, float)) for row in result["rows"])
        t.add_column(c, justify="right" if numeric and i else "left")
    for r in rows:
        t.add_row(*r)
    Console(width=max(100, width)).print(t)


def markdown_table(result: dict[str, Any]) -> str:
    cols = table_columns(result)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in result.get("rows", []):
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


_UNITS = (
    ("_msgs_s", "msg/s"),
    ("_mb_s", "MB/s"),
    ("_us", "µs"),
    ("_ms", "ms"),
    ("_bytes", "bytes"),
    ("_s", "s"),
    ("_mb", "MB"),
)


def axis_label(name: str) -> str:
    """``publish_msgs_s`` -> ``publish (msg/s)``: a label with its unit, from the name."""
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            return f"{name[: -len(suffix)].replace('_', ' ')} ({unit})"
    return name.replace("_", " ")


def _tick(value: float, _: Any = None) -> str:
    if value >= 1:
        return fmt(int(value)) if value == int(value) else fmt(value)
    return f"{value:g}"


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per plot spec: a line per series over x, log axes as the spec says.

    A spec is ``{"y": column, "series": column (optional), "logx", "logy", "label"
    (the y axis, with its unit), "title", "lines": {column: name}}``: ``lines``, if
    given, are the columns drawn on the same axes (``y`` among them), e.g. percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    written: list[Path] = []
    key, x = result["key"], result["x"]
    rows = [r for r in result.get("rows", []) if r.get("ok")]
    for spec in result.get("plots", []):
        y, series = spec["y"], spec.get("series")
        columns = spec.get("lines") or {y: ""}
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        names: list[Any] = []
        for r in rows:
            name = r.get(series) if series else None
            if name not in names:
                names.append(name)
        lines = 0
        for name in names:
            for column, column_name in columns.items():
                pts = sorted(
                    (r[x], r[column])
                    for r in rows
                    if (not series or r.get(series) == name)
                    and isinstance(r.get(column), (int, float))
                    and r[column] == r[column]  # not NaN
                )
                if not pts:
                    continue
                label = " ".join(str(p) for p in (name if len(names) > 1 else "", column_name) if p)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or y)
                lines += 1
        if spec.get("logx"):
            ax.set_xscale("log")
        if spec.get("logy"):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        else:
            ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_tick))
        xs = sorted({r[x] for r in rows if isinstance(r.get(x), (int, float))})
        if xs and len(xs) <= 8:  # a tick at each measured x, labelled plainly
            ax.set_xticks(xs)
            ax.set_xticklabels([fmt(v) for v in xs])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel(result.get("xlabel") or axis_label(x))
        ax.set_ylabel(spec.get("label") or axis_label(y))
        ax.set_title(spec.get("title") or f"{result.get('title', key)}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        if lines > 1:
            legend = spec.get("legend", series if len(names) > 1 else None)
            ax.legend(title=legend, fontsize=8, title_fontsize=8)
        fig.tight_layout()
        path = out / f"curve-{key}-{y}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def machine() -> dict[str, Any]:
    return bench_env.machine(("aio-pika", "aiormq", "pamqp", "pydantic", "matplotlib", "uvloop"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N of every curve (CI: ≲ 90 s)")
    p.add_argument(
        "--only", action="append", default=[], choices=CURVES, help="this curve only; repeatable"
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for curves.json and the PNGs")
    p.add_argument(
        "--banyan-ref",
        help="measure banyan_bus as committed at this git ref (e.g. HEAD) instead of the "
        "working tree, which others may be editing mid-run",
    )
    return p.parse_args(argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # each point's vhost is deleted on the way out


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url = amqp_url()
    selected = [c for c in CURVES if not args.only or c in args.only]
    info = machine()
    snapshot = None
    if args.banyan_ref:
        snapshot, sha = bench_env.banyan_snapshot(args.banyan_ref)
        os.environ["BENCH_BANYAN_SRC"] = snapshot.name
        sys.path.insert(0, snapshot.name)
        info["banyan_commit"], info["banyan_uncommitted"] = sha, []
        info["banyan_source"] = f"git {args.banyan_ref} ({sha})"
    else:
        info["banyan_source"] = "working tree"
    dirty = info.get("banyan_uncommitted")
    print(
        f"machine: {info['nproc']} CPUs, RabbitMQ {info.get('rabbitmq')}, Python "
        f"{info['python']}, banyan_bus from {info['banyan_source']} at "
        f"{info.get('banyan_commit')}{' + uncommitted ' + ', '.join(dirty) if dirty else ''}"
        f"; curves: {', '.join(selected)}{' (QUICK)' if args.quick else ''}",
        flush=True,
    )
    quiet_logs()
    t_start = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    pngs: list[str] = []
    for name in selected:
        try:
            module = importlib.import_module(f"curve_{name}")
        except Exception as exc:
            traceback.print_exc()
            print(f"!!! curve {name!r} cannot be imported: {exc}", file=sys.stderr)
            failed[name] = f"not importable: {exc}"
            continue
        print(f"\n== {name}: {getattr(module, 'TITLE', name)}", flush=True)
        t0 = time.monotonic()
        try:
            result = module.measure(url, args.quick)
            for row in result.get("rows", []):
                row.setdefault("ok", True)  # measure returned: its checks passed
        except AssertionError as exc:
            result = getattr(exc, "result", None) or {"key": name, "rows": []}
            failed[name] = str(exc)
            print(f"!!! CURVE {name} FAILED ITS CHECKS: {exc}", file=sys.stderr, flush=True)
        except Exception as exc:  # a crash, or the broker went away: no valid result
            traceback.print_exc()
            result = {"key": name, "rows": []}
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"!!! CURVE {name} CRASHED: {failed[name]}", file=sys.stderr, flush=True)
        result["seconds"] = round(time.monotonic() - t0, 1)
        result["ok"] = name not in failed
        if name in failed:
            result["error"] = failed[name]
        results[result.get("key", name)] = result
        if result.get("rows"):
            print_table(result)
            try:
                pngs += [str(p) for p in plot(result, out)]
            except Exception as exc:  # a plot that cannot be drawn fails the run too
                traceback.print_exc()
                failed[name] = f"plot: {type(exc).__name__}: {exc}"
                result["ok"] = False
        print(f"({name}: {result['seconds']} s)", flush=True)
    info["loadavg_end"] = os.getloadavg()
    import banyan_bus

    info["banyan_bus_path"] = str(Path(banyan_bus.__file__ or "?").parent)
    if snapshot is not None:
        snapshot.cleanup()
    total = time.monotonic() - t_start
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": info,
        "total_s": round(total, 1),
        "curves": results,
        "failed": failed,
        "pngs": [Path(p).name for p in pngs],
        "vhosts": VHOSTS_USED,
    }
    (out / "curves.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\n{len(results)} curves in {total:.0f} s; JSON and {len(pngs)} PNGs in {out}")
    if failed:
        print(f"\n!!! {len(failed)} CURVE(S) FAILED:", file=sys.stderr)
        for name, why in failed.items():
            print(f"  - {name}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
