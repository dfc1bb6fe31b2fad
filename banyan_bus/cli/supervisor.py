"""``banyan run --workers N``: N processes of one service, started and stopped together.

Each worker is ``python -m banyan_bus.cli run TARGET`` with its own connection;
the supervisor only starts them, forwards signals and waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import structlog

from banyan_bus.cli.errors import EXIT_FAILURE
from banyan_bus.cli.output import Options

#: Set in ``--workers`` children: the worker's number and the supervisor's pid.
ENV_WORKER = "BANYAN_WORKER"
ENV_PARENT = "BANYAN_WORKER_PARENT"

log = structlog.get_logger("banyan_bus.cli")


def worker_command(spec: str, grace: float | None, opts: Options) -> list[str]:
    """The command line of one worker: ``banyan run`` with the supervisor's root options."""
    command = [sys.executable, "-m", "banyan_bus.cli", "--log-format", opts.log_format.value]
    if opts.debug:
        command.append("--debug")
    command += ["run", spec]
    if grace is not None:
        command += ["--grace", str(grace)]
    return command


def supervise(spec: str, workers: int, grace: float | None, opts: Options) -> int:
    """Run ``workers`` processes of the service, forward SIGTERM/SIGINT, wait for all.

    Children run in their own process group so a terminal's Ctrl-C reaches
    them once, through here, not twice. One that exits on its own stops the
    rest: a half-running service is worse than a restart by the orchestrator.
    """
    command = worker_command(spec, grace, opts)
    children: dict[int, subprocess.Popen[bytes]] = {}
    # Only children not reaped yet: a reaped pid may belong to another process by now.
    alive: dict[int, subprocess.Popen[bytes]] = {}
    stopping: list[str] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signal.Signals(signum).name)
        for child in list(alive.values()):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for number in range(workers):
            env = {**os.environ, ENV_WORKER: str(number), ENV_PARENT: str(os.getpid())}
            child = subprocess.Popen(command, env=env, process_group=0)
            children[child.pid] = alive[child.pid] = child
        log.info("workers_started", target=spec, workers=workers, pids=sorted(children))
        codes: dict[int, int] = {}
        unexpected = False
        while len(codes) < len(children):
            pid, status = os.wait()
            if pid not in children:
                continue
            alive.pop(pid, None)
            codes[pid] = os.waitstatus_to_exitcode(status)
            if not stopping:
                unexpected = True
                log.error("worker_exited", pid=pid, code=codes[pid], detail="stopping the others")
                forward(signal.SIGTERM, None)
        failed = {pid: code for pid, code in codes.items() if code != 0}
        if failed:
            log.error("workers_failed", exit_codes=failed)
        log.info("workers_stopped", workers=workers)
        return EXIT_FAILURE if failed or unexpected else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
