"""``banyan run --workers N``: N processes of one service, started and stopped together.

Each worker is ``python -m banyan_bus.cli run TARGET`` with its own connection;
the supervisor only starts them, forwards signals, passes their stderr on and
waits. A mistake every worker makes alike (a missing dependency, a bad URL) is
one ``banyan: error:`` line per worker: the supervisor prints each such line
once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import IO, NoReturn

import structlog

from banyan_bus.cli.errors import EXIT_FAILURE, EXIT_INTERRUPTED
from banyan_bus.cli.output import LogFormat, Options, err

#: Set in ``--workers`` children: the worker's number and the supervisor's pid.
ENV_WORKER = "BANYAN_WORKER"
ENV_PARENT = "BANYAN_WORKER_PARENT"

log = structlog.get_logger("banyan_bus.cli")


#: What a second SIGINT/SIGTERM prints, once per command, before exiting at once.
FORCED_EXIT = (
    "banyan: second signal: exiting now; unfinished deliveries go back to their queue "
    "(redelivered to the next consumer)"
)


def force_exit() -> NoReturn:
    """Exit at once, after a second signal, without a traceback from any task.

    The process ends without unwinding the event loop (so no ``Task was
    destroyed`` or ``Event loop is closed`` noise from half-stopped consumers);
    the OS closes the broker connection, and RabbitMQ puts every unacked
    delivery back in its queue. A ``--workers`` child stays silent: its
    supervisor prints the one warning.
    """
    if os.environ.get(ENV_WORKER) is None:
        err.print(FORCED_EXIT, soft_wrap=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


class _ErrorsOnce:
    """Pass workers' stderr through, each distinct ``banyan: error:`` line only once."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def follow(self, stream: IO[bytes]) -> None:
        thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _pump(self, stream: IO[bytes]) -> None:
        target = sys.stderr.buffer
        for line in stream:
            with self._lock:
                if line.startswith(b"banyan: "):
                    if line in self._seen:
                        continue
                    self._seen.add(line)
                target.write(line)
                target.flush()

    def join(self, timeout: float = 5.0) -> None:
        for thread in self._threads:
            thread.join(timeout)


def worker_command(spec: str, grace: float | None, opts: Options) -> list[str]:
    """The command line of one worker: ``banyan run`` with the supervisor's root options.

    ``--log-format auto`` is decided here, by the supervisor's terminal: the
    workers' stderr is a pipe to the supervisor.
    """
    log_format = opts.log_format
    if log_format == LogFormat.auto:
        log_format = LogFormat.console if sys.stderr.isatty() else LogFormat.json
    command = [sys.executable, "-m", "banyan_bus.cli", "--log-format", log_format.value]
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
        if stopping:  # the second one: the workers exit at once, and say nothing
            err.print(FORCED_EXIT, soft_wrap=True)
        stopping.append(signal.Signals(signum).name)
        for child in list(alive.values()):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    errors = _ErrorsOnce()
    try:
        for number in range(workers):
            env = {**os.environ, ENV_WORKER: str(number), ENV_PARENT: str(os.getpid())}
            child = subprocess.Popen(command, env=env, process_group=0, stderr=subprocess.PIPE)
            assert child.stderr is not None
            errors.follow(child.stderr)
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
        errors.join()
        if len(stopping) > 1:
            return EXIT_INTERRUPTED
        failed = {pid: code for pid, code in codes.items() if code != 0}
        if failed:
            log.error("workers_failed", exit_codes=failed)
        log.info("workers_stopped", workers=workers)
        return EXIT_FAILURE if failed or unexpected else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
