"""banyan_bus against raw aiormq, raw aio-pika and FastStream, side by side, in one command::

    python benchmarks/run.py [--rounds 3] [--quick] [--only WORKLOAD] [--out FILE]

Each workload runs for every implementation, interleaved (aiormq, raw, faststream,
banyan, aiormq, raw, ...), each run a fresh ``python benchmarks/workloads.py`` process
on a vhost of its own. Reported: medians over the rounds, the ratios to raw aiormq
(the floor) and to raw aio-pika, and client CPU µs per message (steadier than msg/s on
a shared machine). The memory section (``--only memory``: ``benchmarks/memory.py``)
reports KiB per in-flight message and per idle subscription, banyan against aiormq.
A run that fails its own correctness check is printed loudly, never counted, and
makes this command exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_env  # noqa: E402
import vhosts  # noqa: E402
from bench_env import BrokerWatch  # noqa: E402

RESULT_MARK = "BENCH_RESULT "
IMPLS = ("aiormq", "raw", "faststream", "banyan")
FLOOR = "aiormq"  # every figure is also a ratio to raw aiormq


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    cmd: str  # workloads.py workload name
    n: int
    quick_n: int
    args: tuple[str, ...] = ()
    impls: tuple[str, ...] = IMPLS
    target: str = ""
    kind: str = "throughput"  # or "latency", "scaling", "memory"


MEMORY_IMPLS = ("aiormq", "banyan")

WORKLOADS = (
    Workload(
        "1-publish-seq", "publish, confirms, sequential", "publish-seq", 3000, 300, target="≥ 0.95"
    ),
    Workload(
        "2-publish-pipe",
        "publish, confirms, 500 in flight",
        "publish-pipe",
        20000,
        2000,
        target="≥ 0.90",
    ),
    Workload(
        "3-consume-p100",
        "consume → pydantic, prefetch 100",
        "consume",
        20000,
        2000,
        ("--prefetch", "100"),
        target="≥ 0.85",
    ),
    Workload(
        "3-consume-p1000",
        "consume → pydantic, prefetch 1000",
        "consume",
        20000,
        2000,
        ("--prefetch", "1000"),
        target="≥ 0.85",
    ),
    Workload(
        "4-latency",
        "end-to-end latency at 1,000 msg/s",
        "latency",
        5000,
        1000,
        ("--rate", "1000", "--prefetch", "100", "--warmup", "500"),
        target="p99 ≤ raw + 0.5 ms",
        kind="latency",
    ),
    Workload(
        "5-io",
        "I/O handlers 10 ms, prefetch 100, conc. 50",
        "io",
        10000,
        1000,
        ("--prefetch", "100", "--concurrency", "50"),
        target="≥ 0.95",
    ),
    Workload(
        "6-workers",
        "banyan consume, 1 vs 2 worker processes",
        "workers",
        40000,
        4000,
        ("--prefetch", "1000"),
        impls=("w1", "w2"),
        target="w2 ≥ 1.6x w1",
        kind="scaling",
    ),
    Workload(
        "6-workers-cpu",
        "as 6, handler burns 1 ms of CPU per message",
        "workers",
        6000,
        1000,
        ("--prefetch", "100", "--handler-cpu-us", "1000"),
        impls=("w1", "w2"),
        target="w2 ≥ 1.6x w1",
        kind="scaling",
    ),
    # memory.py: n is the prefetch (held messages) or the number of idle subscriptions
    Workload(
        "memory-inflight-1k",
        "RSS per in-flight message, 1 KiB payload, prefetch 1000",
        "inflight",
        1000,
        200,
        ("--payload-bytes", "1024"),
        impls=MEMORY_IMPLS,
        kind="memory",
    ),
    Workload(
        "memory-inflight-256k",
        "RSS per in-flight message, 256 KiB payload, prefetch 1000",
        "inflight",
        1000,
        100,
        ("--payload-bytes", str(256 * 1024)),
        impls=MEMORY_IMPLS,
        kind="memory",
    ),
    Workload(
        "memory-idle",
        "RSS per idle subscription (200 on RabbitMQ)",
        "idle",
        200,
        20,
        impls=MEMORY_IMPLS,
        kind="memory",
    ),
)


@dataclass
class Run:
    workload: str
    impl: str
    round: int
    ok: bool
    wall_s: float
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def command(w: Workload, impl: str, quick: bool, queue_type: str) -> list[str]:
    n = w.quick_n if quick else w.n
    if w.kind == "memory":
        cmd = [sys.executable, str(HERE / "memory.py"), impl, w.cmd, "--n", str(n)]
        return [*cmd, "--queue-type", queue_type, *w.args]
    cmd = [sys.executable, str(HERE / "workloads.py")]
    if w.kind == "scaling":
        cmd += ["banyan", w.cmd, "--workers", impl[1:]]
    else:
        cmd += [impl, w.cmd]
    cmd += ["--n", str(n), "--queue-type", queue_type, *w.args]
    if quick and w.kind == "latency":
        cmd += ["--warmup", "200"]
    return cmd


EXIT_INFRA = 2  # workloads.py: the broker was unreachable or went away; nothing valid measured


# Outages during a run (ports only: an alarm is measured like any other slowness here).
WATCH = BrokerWatch()


def run_one(w: Workload, impl: str, rnd: int, args: argparse.Namespace) -> Run:
    """One fresh process; retried (at most twice) only when the broker's admin API
    failed before anything was measured — never after a wrong result."""
    for attempt in range(3):
        WATCH.wait_answering()
        t0 = time.monotonic()
        run = _run_once(w, impl, rnd, args)
        if WATCH.outage_between(t0, time.monotonic()):
            run.result["broker_outage"] = True
            if not run.ok:
                run.result["infra"] = True
        infra = run.result.get("infra") is True or run.result.get("broker_outage") is True
        if not infra or attempt == 2:
            return run
        why = run.error.splitlines()[0] if run.error else "the broker was unreachable meanwhile"
        print(f"    (broker trouble, run retried: {why})", flush=True)
        time.sleep(5)
    raise AssertionError("unreachable")


def _run_once(w: Workload, impl: str, rnd: int, args: argparse.Namespace) -> Run:
    vhost = f"bench-{w.key}-{impl}-r{rnd}-{uuid.uuid4().hex[:6]}"
    cmd = [*command(w, impl, args.quick, args.queue_type), "--vhost", vhost]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=args.env
    )
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the run, and let it clean up
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(vhosts.BrokerAdminError):
            vhosts.delete_vhost(vhost)
        raise
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # asyncio.run cancels: the run deletes its vhost
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        with contextlib.suppress(vhosts.BrokerAdminError):
            vhosts.delete_vhost(vhost)
        return Run(
            w.key,
            impl,
            rnd,
            False,
            time.monotonic() - t0,
            error=f"timed out after {args.timeout:.0f}s; its progress:\n{stderr[-1500:]}",
        )
    wall = time.monotonic() - t0
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_MARK)]
    result = json.loads(lines[-1][len(RESULT_MARK) :]) if lines else {}
    if proc.returncode == EXIT_INFRA:
        result["infra"] = True
    if proc.returncode != 0 or not result.get("ok"):
        error = result.get("error") or f"exit {proc.returncode}"
        return Run(
            w.key,
            impl,
            rnd,
            False,
            wall,
            result,
            error=f"{error}\n--- stderr (tail) ---\n{stderr[-1500:]}",
        )
    return Run(w.key, impl, rnd, True, wall, result)


def describe(run: Run) -> str:
    r = run.result
    if not run.ok:
        return f"FAILED: {run.error.splitlines()[0] if run.error else '?'}"
    if "kib_per_unit" in r:
        text = f"{r['kib_per_unit']:9.1f} KiB per {r['unit']}"
        if "beyond_body_kib" in r:
            text += f" ({r['beyond_body_kib']:.1f} beyond its {r['body_bytes']:,}-byte body)"
        rss = f"RSS {r['rss_before_mib']:.1f} -> {r['rss_after_mib']:.1f} MiB"
        return f"{text}  {rss}  ({run.wall_s:.1f}s)"
    text = f"{r['rate']:>9,.0f} msg/s  {r['cpu_us_per_msg']:6.0f} µs/msg"
    broker = r.get("broker_cpu_us_per_msg")
    if broker is not None and broker == broker:  # not NaN
        text += f" (broker {broker:4.0f})"
    if "p99_ms" in r:
        text += f"  p50 {r['p50_ms']:.2f}  p99 {r['p99_ms']:.2f}  max {r['max_ms']:.1f} ms"
    if "per_worker" in r:
        text += f"  per worker {r['per_worker']}"
    return f"{text}  ({run.wall_s:.1f}s)"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _outcomes(runs: list[Run], w: Workload, impl: str) -> tuple[list[dict[str, Any]], int]:
    """The results of ``impl``'s passed runs of workload ``w``, and how many failed."""
    mine = [r for r in runs if r.workload == w.key and r.impl == impl]
    return [r.result for r in mine if r.ok], sum(1 for r in mine if not r.ok)


def summarize(runs: list[Run], selected: list[Workload]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for w in selected:
        if w.kind == "memory":
            rows.extend(_summarize_memory(runs, w))
            continue
        base_impl = "w1" if w.kind == "scaling" else "raw"
        stats: dict[str, dict[str, Any]] = {}
        for impl in w.impls:
            ok, failed = _outcomes(runs, w, impl)
            s: dict[str, Any] = {
                "runs": len(ok),
                "failed": failed,
                "rate": median([r["rate"] for r in ok]),
                "cpu_us_per_msg": median([r["cpu_us_per_msg"] for r in ok]),
                "broker_cpu_us_per_msg": median(
                    [
                        r["broker_cpu_us_per_msg"]
                        for r in ok
                        if r.get("broker_cpu_us_per_msg") == r.get("broker_cpu_us_per_msg")
                    ]
                ),
            }
            for key in ("p50_ms", "p99_ms", "max_ms"):
                if ok and key in ok[0]:
                    s[key] = median([r[key] for r in ok])
            stats[impl] = s
        base = stats.get(base_impl, {})
        floor = stats.get(FLOOR, {})
        for impl, s in stats.items():
            row = {
                "workload": w.key,
                "title": w.title,
                "kind": w.kind,
                "impl": impl,
                "target": w.target,
                **s,
            }
            for suffix, ref in (("", base), ("_aiormq", floor)):
                if s["rate"] and ref.get("rate"):
                    row[f"ratio{suffix}"] = s["rate"] / ref["rate"]
                if s["cpu_us_per_msg"] and ref.get("cpu_us_per_msg"):
                    row[f"cpu_ratio{suffix}"] = s["cpu_us_per_msg"] / ref["cpu_us_per_msg"]
            if "p99_ms" in s and "p99_ms" in base:
                row["p99_delta_ms"] = s["p99_ms"] - base["p99_ms"]
            rows.append(row)
    return rows


def _summarize_memory(runs: list[Run], w: Workload) -> list[dict[str, Any]]:
    """Medians of KiB per unit (in-flight message or idle subscription); against aiormq."""
    stats: dict[str, dict[str, Any]] = {}
    for impl in w.impls:
        ok, failed = _outcomes(runs, w, impl)
        s: dict[str, Any] = {
            "runs": len(ok),
            "failed": failed,
            "unit": ok[0]["unit"] if ok else None,
            "count": ok[0]["count"] if ok else None,
            "kib_per_unit": median([r["kib_per_unit"] for r in ok]),
        }
        if ok and "body_bytes" in ok[0]:
            s["body_bytes"] = ok[0]["body_bytes"]
            s["payload_bytes"] = ok[0]["payload_bytes"]
            s["beyond_body_kib"] = median([r["beyond_body_kib"] for r in ok])
        stats[impl] = s
    floor = stats.get(FLOOR, {})
    rows = []
    for impl, s in stats.items():
        row = {"workload": w.key, "title": w.title, "kind": w.kind, "impl": impl, **s}
        base = floor.get("kib_per_unit")
        if s["kib_per_unit"] is not None and base is not None:
            row["delta_aiormq_kib"] = s["kib_per_unit"] - base
            if base > 0:  # a quick run's RSS can stay on the same pages
                row["ratio_aiormq"] = s["kib_per_unit"] / base
        rows.append(row)
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _latency(r: dict[str, Any], sep: str) -> str:
    if "p99_ms" not in r:
        return ""
    lat = sep.join((f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['max_ms']:.1f}"))
    return lat


def _runs(r: dict[str, Any]) -> str:
    return f"{r['runs']}" + (f" ({r['failed']} FAILED)" if r["failed"] else "")


SPEED_HEADERS = [
    "workload",
    "impl",
    "msg/s",
    "x aiormq",
    "x raw",
    "CPU µs/msg",
    "CPU x aiormq",
    "CPU x raw",
    "broker µs/msg",
    "p50/p99/max ms",
    "target",
    "runs",
]
MEMORY_HEADERS = [
    "workload",
    "impl",
    "KiB per unit",
    "x aiormq",
    "KiB over aiormq",
    "body bytes",
    "beyond body KiB",
    "unit",
    "runs",
]


def _speed_cells(r: dict[str, Any]) -> list[str]:
    lat = _latency(r, "/")
    if "p99_delta_ms" in r and r["impl"] != "raw":
        lat += f" (p99 {r['p99_delta_ms']:+.2f})"
    return [
        r["workload"],
        r["impl"],
        fmt(r["rate"], ",.0f"),
        fmt(r.get("ratio_aiormq"), ".2f"),
        fmt(r.get("ratio"), ".2f"),
        fmt(r["cpu_us_per_msg"], ".0f"),
        fmt(r.get("cpu_ratio_aiormq"), ".2f"),
        fmt(r.get("cpu_ratio"), ".2f"),
        fmt(r.get("broker_cpu_us_per_msg"), ".0f"),
        lat,
        r["target"],
        _runs(r),
    ]


def _memory_cells(r: dict[str, Any]) -> list[str]:
    return [
        r["workload"],
        r["impl"],
        fmt(r["kib_per_unit"], ".1f"),
        fmt(r.get("ratio_aiormq"), ".2f"),
        fmt(r.get("delta_aiormq_kib"), "+.1f"),
        fmt(r.get("body_bytes"), ","),
        fmt(r.get("beyond_body_kib"), ".1f"),
        f"{r['unit'] or '—'} (x{r['count']})" if r.get("count") else (r["unit"] or "—"),
        _runs(r),
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    speed = [_speed_cells(r) for r in rows if r.get("kind") != "memory"]
    memory = [_memory_cells(r) for r in rows if r.get("kind") == "memory"]
    if speed:
        title = "banyan_bus vs raw aiormq, raw aio-pika, FastStream (medians)"
        _print(title, SPEED_HEADERS, speed)
    if memory:
        title = "memory: RSS per in-flight message / idle subscription (medians)"
        _print(title, MEMORY_HEADERS, memory)


def _print(title: str, headers: list[str], table: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(wd) for h, wd in zip(headers, widths, strict=True)))
        for row in table:
            print("  ".join(c.ljust(wd) for c, wd in zip(row, widths, strict=True)))
        return
    t = Table(title=title)
    for h in headers:
        t.add_column(h, justify="left" if h in ("workload", "impl", "target", "unit") else "right")
    for row in table:
        t.add_row(*row)
    Console(width=180).print(t)


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The summary as Markdown tables (for benchmarks/README.md)."""
    lines = [
        "| workload | impl | msg/s | vs aiormq | vs raw | client CPU µs/msg | CPU vs aiormq "
        "| CPU vs raw | broker CPU µs/msg | p50 / p99 / max ms | target |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        if r.get("kind") == "memory":
            continue
        lines.append(
            f"| {r['workload']} | {r['impl']} | {fmt(r['rate'], ',.0f')} "
            f"| {fmt(r.get('ratio_aiormq'), '.2f')} | {fmt(r.get('ratio'), '.2f')} "
            f"| {fmt(r['cpu_us_per_msg'], '.0f')} | {fmt(r.get('cpu_ratio_aiormq'), '.2f')} "
            f"| {fmt(r.get('cpu_ratio'), '.2f')} | {fmt(r.get('broker_cpu_us_per_msg'), '.0f')} "
            f"| {_latency(r, ' / ')} | {r['target']} |"
        )
    memory = [r for r in rows if r.get("kind") == "memory"]
    if memory:
        if len(lines) == 2:
            lines = []
        else:
            lines.append("")
        lines += [
            "| workload | impl | KiB per unit | vs aiormq | KiB over aiormq | body bytes "
            "| beyond body KiB | unit |",
            "|---|---|--:|--:|--:|--:|--:|---|",
        ]
        for r in memory:
            cells = _memory_cells(r)[:-1]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    return bench_env.machine(("aio-pika", "aiormq", "pamqp", "pydantic", "faststream", "uvloop"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds of interleaved runs (≥ 3)")
    p.add_argument("--quick", action="store_true", help="small N, to check the harness")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        help="workload key or prefix (1, 3-consume, publish, latency...); repeatable",
    )
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset")
    p.add_argument(
        "--queue-type",
        choices=("quorum", "classic"),
        default="quorum",
        help="queue type for every implementation (banyan's default: quorum)",
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    p.add_argument(
        "--banyan-ref",
        help="benchmark banyan_bus as committed at this git ref (e.g. HEAD) instead of the "
        "working tree, which other engineers may be editing mid-run",
    )
    p.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    return p.parse_args(argv)


def select(only: list[str]) -> list[Workload]:
    """``--only`` takes a workload number (``3``), key or key prefix (``3-consume-p1000``,
    ``3-consume``), or name (``consume``, ``latency``, ``publish``)."""
    if not only:
        return list(WORKLOADS)

    def matches(w: Workload, o: str) -> bool:
        number, name = w.key.split("-", 1)
        if o.isdigit():
            return o == number
        return w.key.startswith(o) or name.startswith(o) or w.cmd.startswith(o)

    chosen = [w for w in WORKLOADS if any(matches(w, o) for o in only)]
    if not chosen:
        raise SystemExit(f"--only {only}: no such workload; keys: {[w.key for w in WORKLOADS]}")
    return chosen


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    WATCH.start()
    args = parse_args(argv)
    selected = select(args.only)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    info = machine()
    args.env = dict(os.environ)
    snapshot = None
    if args.banyan_ref:
        snapshot, sha = bench_env.banyan_snapshot(args.banyan_ref)
        args.env["BENCH_BANYAN_SRC"] = snapshot.name
        info["banyan_source"] = f"git {args.banyan_ref} ({sha})"
    else:
        info["banyan_source"] = "working tree" + (
            f" (uncommitted: {', '.join(info['banyan_uncommitted'])})"
            if info.get("banyan_uncommitted")
            else ""
        )
    print(
        f"machine: {info['nproc']} CPUs, RabbitMQ {info.get('rabbitmq')}, Python "
        f"{info['python']}, aio-pika {info['aio-pika']}, FastStream {info['faststream']}, "
        f"banyan from {info['banyan_source']}; queues: {args.queue_type}"
        f"{' (QUICK)' if args.quick else ''}"
    )
    runs: list[Run] = []
    t_start = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        for w in selected:
            for impl in w.impls:
                if w.kind != "scaling" and impl not in impls:
                    continue
                if w.kind == "scaling" and "banyan" not in impls:
                    continue
                run = run_one(w, impl, rnd, args)
                runs.append(run)
                print(f"[{rnd}/{args.rounds}] {w.key:<16} {impl:<10} {describe(run)}", flush=True)
                if not run.ok:
                    print(
                        f"!!! RUN FAILED — {w.key} {impl} round {rnd}:\n{run.error}",
                        file=sys.stderr,
                        flush=True,
                    )
    info["loadavg_end"] = os.getloadavg()
    if snapshot is not None:
        snapshot.cleanup()
    rows = summarize(runs, selected)
    print()
    print_table(rows)
    failed = [r for r in runs if not r.ok]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "config": {
            "rounds": args.rounds,
            "quick": args.quick,
            "queue_type": args.queue_type,
            "workloads": [w.key for w in selected],
            "impls": impls,
        },
        "total_s": time.monotonic() - t_start,
        "summary": rows,
        "runs": [r.__dict__ for r in runs],
    }
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, info))
    print(f"\n{len(runs)} runs in {doc['total_s']:.0f}s; JSON: {out}")
    if failed:
        print(
            f"\n!!! {len(failed)} RUN(S) FAILED and are not counted (a wrong result, or broker "
            f"trouble that outlasted the retries — see each error):",
            file=sys.stderr,
        )
        for r in failed:
            print(
                f"  - {r.workload} {r.impl} round {r.round}: {r.error.splitlines()[0]}",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
