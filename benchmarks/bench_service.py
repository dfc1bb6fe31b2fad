"""The service ``banyan run`` runs in workload 6 (``workloads.py banyan workers``)::

    BENCH_URL=... BENCH_DIR=... python -m banyan_bus.cli run bench_service:make_bus() --workers 2

One subscription group consuming the pre-filled queue with a typed handler, as in
workload 3. Configured by the environment ``workloads.py`` sets: ``BENCH_URL`` (the
run's vhost), ``BENCH_QUEUE_TYPE``, ``BENCH_PREFETCH``, ``BENCH_HANDLER_CPU_US`` (CPU
time the handler burns per message, 0 by default) and ``BENCH_DIR``, where each
worker process talks to the harness through files:

* writes ``ready.<pid>`` once imported, then waits for ``go`` before handing its bus to
  the CLI (so every worker starts consuming at the same moment);
* keeps ``progress.<pid>`` up to date (messages handled so far);
* at exit, after the CLI stopped the bus on SIGTERM, writes ``result.<pid>.json``: the
  seqs it handled, and the time and CPU time of its first and last one.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import time
from pathlib import Path
from typing import Any

from workloads import GROUP, Banyan

_handled: list[int] = []
_tasks: list[asyncio.Task[None]] = []
_state = {"t_first": 0.0, "t_last": 0.0, "cpu_first": 0.0, "cpu_last": 0.0}


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # readers never see half a file


def _write_result(folder: Path) -> None:
    result = {"ok": True, "count": len(_handled), "seqs": _handled, **_state}
    _write(folder / f"result.{os.getpid()}.json", json.dumps(result))


async def _report_progress(folder: Path) -> None:
    path = folder / f"progress.{os.getpid()}"
    while True:
        _write(path, str(len(_handled)))
        await asyncio.sleep(0.05)


_BURN_S = int(os.environ.get("BENCH_HANDLER_CPU_US", "0")) / 1e6


def _burn(seconds: float) -> None:
    """CPU work a real handler would do (parsing, computing): the case worker processes
    are for, since one process runs its handlers on one core."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


async def handle(event: Any) -> None:
    if _BURN_S:
        _burn(_BURN_S)
    now = time.monotonic()
    if not _handled:
        _state["t_first"], _state["cpu_first"] = now, time.process_time()
    _handled.append(event.seq)
    _state["t_last"], _state["cpu_last"] = now, time.process_time()


async def make_bus() -> Any:
    """The factory ``banyan run`` calls in each worker process."""
    folder = Path(os.environ["BENCH_DIR"])
    prefetch = int(os.environ.get("BENCH_PREFETCH", "1000"))
    impl = Banyan(os.environ["BENCH_URL"], os.environ.get("BENCH_QUEUE_TYPE", "quorum"))
    bus = impl.bus()
    await bus.subscribe(
        impl.contract, handle, subscription_group=GROUP, concurrency=prefetch, prefetch=prefetch
    )
    atexit.register(_write_result, folder)
    _write(folder / f"ready.{os.getpid()}", "")
    while not (folder / "go").exists():  # noqa: ASYNC110 - the barrier is another process's file
        await asyncio.sleep(0.01)
    _tasks.append(asyncio.create_task(_report_progress(folder)))  # referenced: not collected
    return bus
