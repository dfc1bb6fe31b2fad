"""``banyan run``: run a service until SIGTERM/SIGINT, then stop it gracefully."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from typing import Annotated

import structlog
import typer

from banyan_bus.cli.errors import EXIT_INTERRUPTED, reported
from banyan_bus.cli.output import configure_logging, options, quiet_clients
from banyan_bus.cli.supervisor import ENV_PARENT, ENV_WORKER, supervise
from banyan_bus.cli.targets import Target, locate, resolve, run_async

log = structlog.get_logger("banyan_bus.cli")


async def _watch_parent(parent: int, stop: Callable[[str], None]) -> None:
    """A worker whose supervisor died (SIGKILL) stops by itself instead of lingering."""
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            stop("supervisor-gone")
            return


async def serve(target: Target, grace: float | None, loop_name: str, *, debug: bool) -> int:
    """Start the target's bus, wait for a signal, stop it within ``grace`` seconds."""
    bus = await resolve(target)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    stopping = asyncio.Event()
    why: list[str] = []
    bound = log.bind(service=bus.service, pid=os.getpid())
    worker = os.environ.get(ENV_WORKER)
    if worker is not None:
        bound = bound.bind(worker=worker)

    def stop(reason: str) -> None:
        if not stopping.is_set():
            why.append(reason)
            stopping.set()
        elif main_task is not None and reason != "supervisor-gone":
            # A second Ctrl-C: stop waiting. Whatever is unacked goes back to its queue
            # when the connection drops, so this loses nothing; it only skips the grace.
            bound.warning("forced_exit", signal=reason)
            main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    watchdog = None
    parent = os.environ.get(ENV_PARENT)
    if parent is not None and parent.isdigit():
        watchdog = asyncio.create_task(_watch_parent(int(parent), stop))
    try:
        await bus.start()
        if not debug:
            quiet_clients(False)  # connected: from now on their reconnect warnings matter
        bound.info("service_running", url=bus.transport.display_url, event_loop=loop_name)
        await stopping.wait()
        effective = bus.grace_period if grace is None else grace
        bound.info("service_stopping", signal=why[0], grace_s=effective)
        await bus.stop(grace_period=effective)
        bound.info("service_stopped")
        return 0
    except asyncio.CancelledError:
        return EXIT_INTERRUPTED
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="module:bus or module:factory()")],
    workers: Annotated[
        int, typer.Option(min=1, help="Processes to run, each with its own connection.")
    ] = 1,
    grace: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds in-flight handlers get to finish on stop (default: the bus's, 30).",
        ),
    ] = None,
) -> None:
    """Run a service until SIGTERM/SIGINT, then stop gracefully.

    On a signal it stops consuming, lets in-flight handlers finish within the
    grace period, returns unfinished messages to their queue and disconnects.
    """
    opts = options(ctx)
    configure_logging(opts, logging.INFO)
    with reported(debug=opts.debug):
        located = locate(target)  # fails here, once, before any worker starts
        if workers > 1:
            code = supervise(target, workers, grace, opts)
        else:
            code = run_async(lambda loop_name: serve(located, grace, loop_name, debug=opts.debug))
    if code:
        raise typer.Exit(code)
