"""The ``banyan`` command: run a service, publish an event, show its topology, document it.

::

    banyan run examples.signup.email_service:bus [--workers N] [--grace SECONDS]
    banyan publish examples.signup.user_service:bus UserCreated '{"userId": "usr_1", ...}'
    banyan topology examples.signup.email_service:bus [--declare] [--json]
    banyan asyncapi examples.signup.email_service:bus [-o asyncapi.json]
    banyan dlq list|show|replay|purge examples.signup.email_service:bus [--type T] [--group G]

A *target* is ``module:attribute``: the attribute is a ``MessageBus``, or
``module:factory()`` names a callable (sync or async) that returns one. The
current directory is importable, as with ``python -m``.

Errors a user can fix (a bad target, an unknown message type, invalid JSON, a
broker that does not answer) print one line on stderr and exit non-zero:
2 for bad input, 1 for everything else. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import enum
import importlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import structlog
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from banyan_bus.contracts import Event
from banyan_bus.errors import BanyanError

if TYPE_CHECKING:
    from banyan_bus.bus import MessageBus
    from banyan_bus.contracts import ContractRegistry
    from banyan_bus.dlq import DeadLetter, DeadLetterQueue
    from banyan_bus.topology import Declaration
    from banyan_bus.transport.base import Transport

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Set in ``--workers`` children: the worker's number and the supervisor's pid.
ENV_WORKER = "BANYAN_WORKER"
ENV_PARENT = "BANYAN_WORKER_PARENT"

log = structlog.get_logger("banyan_bus.cli")

app = typer.Typer(
    name="banyan",
    help="Run and operate banyan_bus services.",
    no_args_is_help=True,
    add_completion=False,
    # One line per error unless --debug; typer's rich tracebacks would bury it.
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(
    help="Inspect, replay or purge dead-letter queues.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")

# Piped output is read by people too (CI logs, `| less`): wide enough for queue names.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)


@dataclass
class _Options:
    debug: bool = False
    log_format: str = "auto"


_options = _Options()


class CliError(Exception):
    """A mistake the user can fix from the message alone: one line, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- logging ------------------------------------------------------------------------------


#: Client libraries that log a connection failure themselves, which we report as one line.
_CLIENT_LOGGERS = ("aiormq", "aio_pika")


class LogFormat(enum.StrEnum):
    auto = "auto"
    console = "console"
    json = "json"


def configure_logging(level: int = logging.INFO) -> None:
    """The platform's structlog setup (``banyan_bus.logging``), on stderr.

    stdout stays for command output (a message id, a table, a document). JSON
    lines unless stderr is a terminal, or as ``--log-format`` says.
    """
    from banyan_bus.logging import configure

    if _options.debug:
        level = logging.DEBUG
    json_lines = (
        None if _options.log_format == LogFormat.auto else (_options.log_format == LogFormat.json)
    )
    configure(json=json_lines, level=level)
    _quiet_clients(not _options.debug)


def _quiet_clients(quiet: bool) -> None:
    """Silence aio-pika/aiormq's own error lines while connecting: a failed connect is
    reported once, by us. Once connected, their reconnect warnings matter again."""
    for name in _CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL if quiet else logging.WARNING)


# -- errors -------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe_validation(exc: ValidationError, what: str | None = None) -> str:
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "payload"
        problems.append(f"{where}: {error['msg']}")
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return f"payload does not fit {what or exc.title}: " + "; ".join(problems) + more


def _describe(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, CliError):
        return exc.exit_code, str(exc)
    if isinstance(exc, ValidationError):
        return EXIT_USAGE, _describe_validation(exc)
    if isinstance(exc, BanyanError):
        return EXIT_FAILURE, str(exc)
    return EXIT_FAILURE, f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """Turn any failure into one line on stderr and a non-zero exit (all of it with --debug)."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if _options.debug:
            raise
        code, message = _describe(exc)
        err.print(f"banyan: error: {escape(_one_line(message))}", soft_wrap=True)
        raise typer.Exit(code) from None


# -- targets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    spec: str
    obj: object
    call: bool


def _locate(spec: str) -> _Target:
    """Import ``module`` of ``module:attr`` (or ``module:factory()``) and find the attribute."""
    module_name, sep, attr = spec.partition(":")
    call = attr.endswith("()")
    attr = attr[:-2] if call else attr
    if not sep or not module_name or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise CliError(
            f"target {spec!r} is not module:attribute; e.g. examples.signup.email_service:bus "
            f"or myservice.app:create_bus()"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:  # like `python -m`: the current directory's packages import
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise CliError(
                f"cannot import {module_name!r}: no module named {exc.name!r} (run banyan "
                f"from the directory that contains it, or install it)"
            ) from exc
        raise CliError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}", EXIT_FAILURE
        ) from exc
    except Exception as exc:
        raise CliError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {_one_line(str(exc))}",
            EXIT_FAILURE,
        ) from exc
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"module {module_name!r} has no attribute {attr!r} (target {spec!r})")
        obj = getattr(obj, part)
    if call and not callable(obj):
        raise CliError(f"{spec!r}: {attr} is not callable")
    return _Target(spec, obj, call)


async def _resolve(target: _Target) -> MessageBus:
    """The target's bus, calling (and awaiting) a factory."""
    obj = target.obj
    if target.call and callable(obj):
        obj = obj()
        if inspect.isawaitable(obj):
            obj = await obj
    return _check_bus(target.spec, obj, called=target.call)


def _load_bus(spec: str) -> MessageBus:
    """The bus of ``spec`` for the commands that do not run it.

    An async factory gets a short event loop of its own; it should build the
    bus, not start it (the commands start what they need).
    """
    target = _locate(spec)
    if target.call and inspect.iscoroutinefunction(target.obj):
        return asyncio.run(_resolve(target))
    obj = target.obj() if target.call and callable(target.obj) else target.obj
    return _check_bus(spec, obj, called=target.call)


def _check_bus(spec: str, obj: object, *, called: bool) -> MessageBus:
    from banyan_bus.bus import MessageBus

    if not isinstance(obj, MessageBus):
        hint = " (add () to call a factory)" if callable(obj) and not called else ""
        raise CliError(f"{spec!r} is a {type(obj).__name__}, not a MessageBus{hint}")
    return obj


# -- event loop ---------------------------------------------------------------------------


def _loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop when installed (``pip install banyan-bus[speed]``): ~10% more throughput."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None, "asyncio"
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory, "uvloop"


def _run_async(main: Callable[[str], Coroutine[Any, Any, T]]) -> T:
    factory, name = _loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main(name))


# -- banyan (root options) ----------------------------------------------------------------


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and debug log lines.")
    ] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(help="Log lines: JSON, console, or auto (JSON unless on a terminal)."),
    ] = LogFormat.auto,
) -> None:
    _options.debug = debug
    _options.log_format = log_format.value


# -- banyan run ---------------------------------------------------------------------------


async def _watch_parent(parent: int, stop: Callable[[str], None]) -> None:
    """A worker whose supervisor died (SIGKILL) stops by itself instead of lingering."""
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            stop("supervisor-gone")
            return


async def _serve(target: _Target, grace: float | None, loop_name: str) -> int:
    bus = await _resolve(target)
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
        if not _options.debug:
            _quiet_clients(False)  # connected: from now on their reconnect warnings matter
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


def _supervise(spec: str, workers: int, grace: float | None) -> int:
    """Run ``workers`` processes of the service, forward SIGTERM/SIGINT, wait for all.

    Children run in their own process group so a terminal's Ctrl-C reaches
    them once, through here, not twice. One that exits on its own stops the
    rest: a half-running service is worse than a restart by the orchestrator.
    """
    command = [sys.executable, "-m", "banyan_bus.cli", "--log-format", _options.log_format]
    if _options.debug:
        command.append("--debug")
    command += ["run", spec]
    if grace is not None:
        command += ["--grace", str(grace)]
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


@app.command()
def run(
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
    configure_logging(logging.INFO)
    with _reported():
        located = _locate(target)  # fails here, once, before any worker starts
        if workers > 1:
            code = _supervise(target, workers, grace)
        else:
            code = _run_async(lambda loop_name: _serve(located, grace, loop_name))
    if code:
        raise typer.Exit(code)


# -- banyan publish -----------------------------------------------------------------------


class PriorityName(enum.StrEnum):
    low = "low"
    normal = "normal"
    high = "high"


def _known_types(registry: ContractRegistry, kind: str) -> list[str]:
    return sorted({c.__message_type__ for c in registry if c.__message_kind__ == kind})


def _find_contract(
    registry: ContractRegistry, message_type: str, version: int | None
) -> type[Event]:
    versions = registry.versions(message_type)
    if not versions:
        known = _known_types(registry, "event")
        close = difflib.get_close_matches(message_type, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CliError(
            f"unknown message type {message_type!r}{hint} Known event types: "
            f"{', '.join(known) or 'none (does the target import its contracts?)'}"
        )
    if version is None:
        contract = versions[max(versions)]
    elif version in versions:
        contract = versions[version]
    else:
        raise CliError(
            f"{message_type} has no version {version}; registered versions: "
            f"{', '.join(str(v) for v in versions)}"
        )
    if not issubclass(contract, Event):
        raise CliError(
            f"{message_type} is a {contract.__message_kind__}; banyan publish sends events "
            f"(commands and queries go to their owner with bus.send() / bus.query())"
        )
    return contract


def _parse_payload(payload: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise CliError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CliError(f"payload must be a JSON object, got {type(data).__name__}")
    return data


def _parse_after(after: str | None) -> int | str | None:
    """``--after 1500`` is milliseconds, like ``publish(after=1500)``; the rest is text."""
    if after is None:
        return None
    from banyan_bus.delay import parse_after

    value: int | str = int(after) if after.strip().isdigit() else after
    try:
        parse_after(value)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return value


@app.command()
def publish(
    target: Annotated[str, typer.Argument(help="module:bus whose contracts to use")],
    message_type: Annotated[str, typer.Argument(help="e.g. UserCreated")],
    payload: Annotated[str, typer.Argument(help="JSON object; camelCase or snake_case keys")],
    after: Annotated[
        str | None, typer.Option(help="Delay: '10 seconds', '2 hours', ms, or an ISO time.")
    ] = None,
    version: Annotated[
        int | None, typer.Option(min=1, help="Contract version (default: the latest).")
    ] = None,
    priority: Annotated[PriorityName, typer.Option(help="Delivery priority.")] = (
        PriorityName.normal
    ),
    correlation_id: Annotated[
        str | None, typer.Option(help="Correlation id (default: a new one).")
    ] = None,
    partition_key: Annotated[
        str | None, typer.Option(help="Partition key (default: the contract's).")
    ] = None,
) -> None:
    """Validate an event against its contract and publish it; prints the message id."""
    configure_logging(logging.WARNING)
    with _reported():
        bus = _load_bus(target)
        contract = _find_contract(bus.contracts, message_type, version)
        delay = _parse_after(after)
        try:
            event = contract.model_validate(_parse_payload(payload))
        except ValidationError as exc:
            what = f"{contract.__message_type__} v{contract.__message_version__}"
            raise CliError(_describe_validation(exc, what)) from exc

        async def send(_loop: str) -> str:
            from banyan_bus.bus import MessageBus

            # A bus of our own, with no subscriptions: starting it must not consume
            # the service's queues. It publishes in the service's name.
            publisher = MessageBus(
                bus.service,
                bus.url,
                contracts=bus.contracts,
                max_message_size=bus.max_message_size,
            )
            async with publisher:
                return await publisher.publish(
                    event,
                    after=delay,
                    priority=priority.value,
                    correlation_id=correlation_id,
                    partition_key=partition_key,
                )

        message_id = _run_async(send)
    out.print(message_id, soft_wrap=True)


# -- banyan topology ----------------------------------------------------------------------


def declaration_dict(decl: Declaration) -> dict[str, Any]:
    """One declaration as JSON-able data (``banyan topology --json``)."""
    from banyan_bus.topology import ExchangeDecl, QueueDecl

    if isinstance(decl, ExchangeDecl):
        return {
            "kind": "exchange",
            "name": decl.name,
            "type": decl.type,
            "arguments": dict(decl.arguments),
        }
    if isinstance(decl, QueueDecl):
        return {"kind": "queue", "name": decl.name, "arguments": dict(decl.arguments)}
    return {
        "kind": "binding",
        "source": decl.source,
        "destination": decl.destination,
        "destination_kind": decl.destination_kind,
        "routing_key": decl.routing_key,
    }


def _arguments_text(arguments: dict[str, Any]) -> str:
    return "\n".join(f"{k}={v}" for k, v in arguments.items())


def _topology_table(service: str, plan: list[Declaration]) -> Table:
    table = Table(title=f"topology of {service}", title_justify="left")
    table.add_column("kind", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("type", no_wrap=True)
    table.add_column("arguments / binding", overflow="fold")
    for decl in plan:
        data = declaration_dict(decl)
        if data["kind"] == "exchange":
            row = ("exchange", data["name"], data["type"], _arguments_text(data["arguments"]))
        elif data["kind"] == "queue":
            args = data["arguments"]
            row = ("queue", data["name"], str(args.get("x-queue-type", "classic")), "")
            row = (*row[:3], _arguments_text(args))
        else:
            key = data["routing_key"]
            row = (
                "binding",
                f"{data['source']} → {data['destination']}",
                data["destination_kind"],
                f"routing key {key!r}" if key else "(no routing key)",
            )
        table.add_row(*(escape(str(cell)) for cell in row))
    return table


async def _connect(bus: MessageBus, purpose: str) -> Transport:
    from banyan_bus.bus import make_transport

    transport = make_transport(bus.url, name=f"{bus.service}-{purpose}")
    await transport.connect()
    return transport


@app.command()
def topology(
    target: Annotated[str, typer.Argument(help="module:bus")],
    declare: Annotated[
        bool, typer.Option("--declare", help="Declare it on the broker now (before a deploy).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show the exchanges, queues and bindings the service declares (and declare them)."""
    configure_logging(logging.WARNING)
    with _reported():
        bus = _load_bus(target)
        plan = bus.topology()
        if as_json:
            out.print_json(json.dumps([declaration_dict(d) for d in plan], default=str))
        else:
            out.print(_topology_table(bus.service, plan))
        if declare:
            from banyan_bus.topology import apply

            async def declare_all(_loop: str) -> str:
                transport = await _connect(bus, "topology")
                try:
                    await apply(transport, plan)
                finally:
                    await transport.close()
                return transport.display_url

            where = _run_async(declare_all)
            counts = {kind: 0 for kind in ("exchange", "queue", "binding")}
            for decl in plan:
                counts[declaration_dict(decl)["kind"]] += 1
            note = (
                " (in-process broker: gone when this command exits)"
                if bus.url.startswith("memory:")
                else ""
            )
            err.print(
                f"declared {counts['exchange']} exchanges, {counts['queue']} queues and "
                f"{counts['binding']} bindings on {where}{note}",
                soft_wrap=True,
            )


# -- banyan asyncapi ----------------------------------------------------------------------


@app.command()
def asyncapi(
    target: Annotated[str, typer.Argument(help="module:bus")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write to this file (default stdout).")
    ] = None,
    publishes: Annotated[
        list[str] | None,
        typer.Option(
            "--publishes",
            help="Event types the service publishes (repeat; default: every registered event).",
        ),
    ] = None,
    api_version: Annotated[str, typer.Option(help="info.version of the document.")] = "1.0.0",
) -> None:
    """Write an AsyncAPI 3.0 document of the service's channels, operations and contracts."""
    configure_logging(logging.WARNING)
    with _reported():
        from banyan_bus.asyncapi import asyncapi_document

        bus = _load_bus(target)
        events: list[type[Event]] | None = None
        if publishes:
            events = [_find_contract(bus.contracts, name, None) for name in publishes]
        document = asyncapi_document(bus, publishes=events, version=api_version)
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        if output is None:
            sys.stdout.write(text)
        else:
            output.write_text(text, encoding="utf-8")
            err.print(f"wrote {output}", soft_wrap=True)


# -- banyan dlq ---------------------------------------------------------------------------


def _subscribed(bus: MessageBus) -> list[tuple[str, str]]:
    from banyan_bus.asyncapi import subscriptions_of

    return [(s.group, s.message_type) for s in subscriptions_of(bus)]


def _dlq_targets(
    bus: MessageBus, group: str | None, message_type: str | None
) -> list[tuple[str, str]]:
    """Which (group, message type) DLQs an option pair means.

    With a type and no group: the group that subscribes to it here (the service
    name if none does; an error if several do).
    """
    subscribed = _subscribed(bus)
    if message_type is None:
        chosen = [(g, t) for g, t in subscribed if group is None or g == group]
        if not chosen:
            raise CliError(
                f"{bus.service} has no subscription{f' in group {group!r}' if group else ''}; "
                f"name the DLQ with --type (and --group)"
            )
        return chosen
    if group is not None:
        return [(group, message_type)]
    groups = sorted({g for g, t in subscribed if t == message_type})
    if len(groups) > 1:
        raise CliError(f"several groups subscribe to {message_type} ({', '.join(groups)}): --group")
    return [(groups[0] if groups else bus.service, message_type)]


def _dead_letter_dict(dead: DeadLetter) -> dict[str, Any]:
    return {
        "ref": dead.ref,
        "message_id": dead.message_id,
        "message_type": dead.message_type,
        "version": dead.version,
        "reason": dead.reason,
        "source": dead.source,
        "exception_type": dead.exception_type,
        "exception_message": dead.exception_message,
        "traceback": dead.traceback,
        "attempts": dead.attempts,
        "first_failure": dead.first_failure.isoformat() if dead.first_failure else None,
        "last_failure": dead.last_failure.isoformat() if dead.last_failure else None,
        "handler": dead.handler,
        "group": dead.group,
        "correlation_id": dead.correlation_id,
        "envelope": dead.envelope,
    }


async def _with_dlqs(
    bus: MessageBus,
    pairs: list[tuple[str, str]],
    work: Callable[[DeadLetterQueue], Awaitable[T]],
) -> list[tuple[DeadLetterQueue, T]]:
    from banyan_bus.dlq import dead_letter_queue

    transport = await _connect(bus, "dlq")
    try:
        return [
            (dlq, await work(dlq)) for dlq in (dead_letter_queue(transport, g, t) for g, t in pairs)
        ]
    finally:
        await transport.close()


def _choose_ids(ids: list[str] | None, everything: bool, verb: str) -> list[str] | None:
    if bool(ids) == everything:
        raise CliError(f"say which messages to {verb}: --id REF (repeatable) or --all")
    return None if everything else list(ids or [])


TargetArg = Annotated[str, typer.Argument(help="module:bus")]
GroupOpt = Annotated[
    str | None, typer.Option("--group", help="Subscription group (default: the one subscribed).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@dlq_app.command("list")
def dlq_list(
    target: TargetArg,
    message_type: Annotated[
        str | None, typer.Option("--type", help="Message type (default: every subscription).")
    ] = None,
    group: GroupOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many per queue.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List dead-lettered messages (they stay in the queue)."""
    configure_logging(logging.WARNING)
    with _reported():
        bus = _load_bus(target)
        pairs = _dlq_targets(bus, group, message_type)

        async def peek(dlq: DeadLetterQueue) -> list[DeadLetter]:
            return await dlq.list(limit)

        found = _run_async(lambda _loop: _with_dlqs(bus, pairs, peek))
        if as_json:
            data = {dlq.name: [_dead_letter_dict(d) for d in dead] for dlq, dead in found}
            out.print_json(json.dumps(data, default=str))
            return
        table = Table(title_justify="left")
        for column in ("queue", "ref", "type", "v", "reason", "tries", "last failure", "error"):
            table.add_column(column, overflow="fold")
        for dlq, dead_letters in found:
            for dead in dead_letters:
                error = (
                    f"{dead.exception_type}: {dead.exception_message}"
                    if dead.exception_type
                    else ""
                )
                table.add_row(
                    *(
                        escape(str(cell))
                        for cell in (
                            dlq.name,
                            dead.ref,
                            dead.message_type or "?",
                            dead.version or "?",
                            dead.reason,
                            dead.attempts,
                            dead.last_failure.isoformat(timespec="seconds")
                            if dead.last_failure
                            else "",
                            error[:120],
                        )
                    )
                )
        total = sum(len(d) for _, d in found)
        table.title = f"{total} dead-lettered message(s) in {len(found)} queue(s)"
        out.print(table)


@dlq_app.command("show")
def dlq_show(
    target: TargetArg,
    ref: Annotated[str, typer.Argument(help="Message id (or the ref `dlq list` shows).")],
    message_type: Annotated[str, typer.Option("--type", help="Message type.")],
    group: GroupOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one dead-lettered message in full: reason, error, traceback, envelope."""
    configure_logging(logging.WARNING)
    with _reported():
        bus = _load_bus(target)
        pairs = _dlq_targets(bus, group, message_type)

        async def find(dlq: DeadLetterQueue) -> DeadLetter | None:
            return await dlq.find(ref)

        [(dlq, dead)] = _run_async(lambda _loop: _with_dlqs(bus, pairs, find))
        if dead is None:
            raise CliError(f"no message {ref!r} in {dlq.name}", EXIT_FAILURE)
        data = _dead_letter_dict(dead)
        if as_json:
            out.print_json(json.dumps(data, default=str))
            return
        traceback, envelope = data.pop("traceback"), data.pop("envelope")
        for key, value in data.items():
            out.print(f"[bold]{key}[/bold]: {escape(str(value))}", soft_wrap=True)
        if traceback:
            out.print("[bold]traceback[/bold]:")
            out.print(escape(str(traceback)), soft_wrap=True)
        out.print("[bold]envelope[/bold]:")
        out.print_json(json.dumps(envelope, default=str))


@dlq_app.command("replay")
def dlq_replay(
    target: TargetArg,
    message_type: Annotated[str, typer.Option("--type", help="Message type.")],
    group: GroupOpt = None,
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="Replay this message (repeatable).")
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Replay every message.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Send dead-lettered messages back to their group (only that group sees them)."""
    configure_logging(logging.WARNING)
    with _reported():
        bus = _load_bus(target)
        pairs = _dlq_targets(bus, group, message_type)
        chosen = _choose_ids(ids, everything, "replay")
        [(dlq, result)] = _run_async(
            lambda _loop: _with_dlqs(bus, pairs, lambda q: q.replay(ids=chosen))
        )
        if as_json:
            data = {"replayed": result.replayed, "failed": result.failed, "missing": result.missing}
            out.print_json(json.dumps(data))
        else:
            out.print(f"replayed {len(result.replayed)} message(s) from {dlq.name}", soft_wrap=True)
            for ref, why in result.failed.items():
                err.print(f"not replayed {ref}: {escape(why)}", soft_wrap=True)
            for ref in result.missing:
                err.print(f"not found: {ref}", soft_wrap=True)
        if not result.ok:
            raise typer.Exit(EXIT_FAILURE)


@dlq_app.command("purge")
def dlq_purge(
    target: TargetArg,
    message_type: Annotated[str, typer.Option("--type", help="Message type.")],
    group: GroupOpt = None,
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="Delete this message (repeatable).")
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Delete every message.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete dead-lettered messages for good."""
    configure_logging(logging.WARNING)
    with _reported():
        bus = _load_bus(target)
        pairs = _dlq_targets(bus, group, message_type)
        chosen = _choose_ids(ids, everything, "purge")
        what = "every message" if chosen is None else f"{len(chosen)} message(s)"
        if not yes and not typer.confirm(f"Delete {what} from the DLQ of {pairs[0][0]}?"):
            raise typer.Abort()
        [(dlq, dropped)] = _run_async(
            lambda _loop: _with_dlqs(bus, pairs, lambda q: q.purge(ids=chosen))
        )
        out.print(f"deleted {dropped} message(s) from {dlq.name}", soft_wrap=True)


def main() -> None:
    """Entry point of the ``banyan`` console script."""
    app()


if __name__ == "__main__":
    main()
