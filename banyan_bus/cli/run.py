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

from banyan_bus import prometheus
from banyan_bus.cli.errors import EXIT_INTERRUPTED, CliError, reported
from banyan_bus.cli.output import configure_logging, options, quiet_clients
from banyan_bus.cli.supervisor import ENV_PARENT, ENV_WORKER, force_exit, supervise
from banyan_bus.cli.targets import Target, announce, locate, resolve, run_async
from banyan_bus.probes import probe_servers

log = structlog.get_logger("banyan_bus.cli")

HEALTH_PORT_ENV = "BANYAN_HEALTH_PORT"
METRICS_PORT_ENV = "BANYAN_METRICS_PORT"


async def _watch_parent(parent: int, stop: Callable[[str], None]) -> None:
    """A worker whose supervisor died (SIGKILL) stops by itself instead of lingering."""
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            stop("supervisor-gone")
            return


async def serve(
    target: Target,
    grace: float | None,
    loop_name: str,
    *,
    debug: bool,
    health_port: int | None = None,
    metrics_port: int | None = None,
) -> int:
    """Start the target's bus, wait for a signal, stop it within ``grace`` seconds.

    The probe servers (``--health-port``/``--metrics-port``) listen from before the
    bus starts until after it stopped: ``/readyz`` answers 503 while it starts and
    drains, ``/livez`` 200 throughout.
    """
    bus = await resolve(target)
    announce(bus)  # which broker, loudly (a bad URL stops here, exit 2)
    probes = probe_servers(bus, health_port=health_port, metrics_port=metrics_port)
    loop = asyncio.get_running_loop()
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
        elif reason != "supervisor-gone":
            # A second Ctrl-C: exit now. Whatever is unacked goes back to its queue
            # when the connection drops, so this loses nothing; it only skips the grace.
            force_exit()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    watchdog = None
    parent = os.environ.get(ENV_PARENT)
    if parent is not None and parent.isdigit():
        watchdog = asyncio.create_task(_watch_parent(int(parent), stop))
    try:
        for server in probes:
            await server.start()
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
        for server in probes:
            await server.close()
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
    health_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            envvar=HEALTH_PORT_ENV,
            help="Serve /livez, /readyz (and /metrics) over HTTP on this port. "
            "With --workers N, worker k listens on this port + k.",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            envvar=METRICS_PORT_ENV,
            help="Serve /metrics (Prometheus text) on this port; needs banyan-bus[prometheus]. "
            "Without it, /metrics is on --health-port when the extra is installed.",
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
        if metrics_port is not None and not prometheus.available():
            raise CliError(f"--metrics-port: {prometheus.INSTALL_HINT}")
        if workers > 1:
            # The workers read the ports from the environment (typer's envvar) and
            # each adds its number, so N workers do not fight over one port.
            for name, port in ((HEALTH_PORT_ENV, health_port), (METRICS_PORT_ENV, metrics_port)):
                if port is not None:
                    os.environ[name] = str(port)
            code = supervise(target, workers, grace, opts)
        else:
            offset = int(os.environ.get(ENV_WORKER, "0"))
            health_port = None if health_port is None else health_port + offset
            metrics_port = None if metrics_port is None else metrics_port + offset
            code = run_async(
                lambda loop_name: serve(
                    located,
                    grace,
                    loop_name,
                    debug=opts.debug,
                    health_port=health_port,
                    metrics_port=metrics_port,
                )
            )
    if code:
        raise typer.Exit(code)
