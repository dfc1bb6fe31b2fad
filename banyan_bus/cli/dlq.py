"""``banyan dlq list|show|replay|purge``: inspect and operate a service's dead-letter queues.

A DLQ belongs to one (subscription group, message type). ``--type`` alone
means the group that subscribes to that type here; no option at all means
every subscription of the service (``list``, ``show``), or its only one
(``replay``, ``purge``).

Everything here prints what a publisher wrote (ids, types, error messages,
headers): it goes through ``output.safe`` so no escape sequence reaches the
operator's terminal. ``--output json`` keeps the exact values, ASCII-escaped.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.table import Table

from banyan_bus.cli.errors import EXIT_FAILURE, CliError, reported
from banyan_bus.cli.output import configure_logging, err, markup, options, out, print_json
from banyan_bus.cli.targets import broker_url, connect, load_bus, run_async

if TYPE_CHECKING:
    from banyan_bus.bus import MessageBus
    from banyan_bus.dlq import DeadLetter, DeadLetterQueue

T = TypeVar("T")

app = typer.Typer(
    help="Inspect, replay or purge dead-letter queues.",
    no_args_is_help=True,
)


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


def _only_one(bus: MessageBus, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` if it names one DLQ; else say which ``--type``/``--group`` to choose from."""
    if len(pairs) > 1:
        named = ", ".join(f"{t} (group {g})" for g, t in pairs)
        raise CliError(f"{bus.service} has several dead-letter queues: {named}; choose with --type")
    return pairs


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
        "headers": dict(dead.headers),
        "envelope": dead.envelope,
    }


async def _with_dlqs(
    bus: MessageBus,
    pairs: list[tuple[str, str]],
    work: Callable[[DeadLetterQueue], Awaitable[T]],
) -> list[tuple[DeadLetterQueue, T]]:
    from banyan_bus.dlq import DeadLetterQueue

    transport = await connect(bus, "dlq")
    try:
        return [
            (dlq, await work(dlq)) for dlq in (DeadLetterQueue(transport, g, t) for g, t in pairs)
        ]
    finally:
        await transport.close()


def _choose_ids(ids: list[str] | None, everything: bool, verb: str) -> list[str] | None:
    if bool(ids) == everything:
        raise CliError(f"say which messages to {verb}: --id REF (repeatable) or --all")
    return None if everything else list(ids or [])


def _list_table(dlq: DeadLetterQueue, dead_letters: list[DeadLetter]) -> Table:
    """One DLQ's messages; its name is the title, so the rows keep their width for ids.

    The ref column never wraps or shrinks: an id is copied as one token.
    """
    table = Table(title=f"{dlq.name}: {len(dead_letters)} message(s)", title_justify="left")
    refs = [markup(dead.ref) for dead in dead_letters]
    table.add_column("ref", no_wrap=True, min_width=max(map(len, refs), default=3))
    table.add_column("type", no_wrap=True)
    table.add_column("v", no_wrap=True)
    table.add_column("reason", no_wrap=True)
    table.add_column("tries", no_wrap=True, justify="right")
    table.add_column("last failure", no_wrap=True)
    table.add_column("error", overflow="fold", ratio=1)
    for ref, dead in zip(refs, dead_letters, strict=True):
        error = f"{dead.exception_type}: {dead.exception_message}" if dead.exception_type else ""
        last = dead.last_failure.isoformat(timespec="seconds") if dead.last_failure else ""
        cells = (
            dead.message_type or "?",
            dead.version or "?",
            dead.reason,
            dead.attempts,
            last,
            error[:200],
        )
        table.add_row(ref, *(markup(cell) for cell in cells))
    return table


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"


TargetArg = Annotated[str, typer.Argument(help="module:bus")]
GroupOpt = Annotated[
    str | None, typer.Option("--group", help="Subscription group (default: the one subscribed).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (same as --output json).")]
OutputOpt = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="table, or json (exact values).")
]
UrlOpt = Annotated[
    str | None, typer.Option("--url", help="Broker URL (default: the bus's, BANYAN_URL).")
]
TypeOpt = Annotated[
    str | None,
    typer.Option("--type", help="Message type (default: the service's only subscription)."),
]


def _load(target: str, url: str | None) -> MessageBus:
    bus = load_bus(target, url)
    broker_url(bus, "dlq", url)
    return bus


@app.command("list")
def dlq_list(
    ctx: typer.Context,
    target: TargetArg,
    message_type: Annotated[
        str | None, typer.Option("--type", help="Message type (default: every subscription).")
    ] = None,
    group: GroupOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many per queue.")] = 100,
    as_json: JsonOpt = False,
    output: OutputOpt = OutputFormat.table,
    url: UrlOpt = None,
) -> None:
    """List dead-lettered messages (they stay in the queue)."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = _load(target, url)
        pairs = _dlq_targets(bus, group, message_type)

        async def peek(dlq: DeadLetterQueue) -> list[DeadLetter]:
            return await dlq.list(limit)

        found = run_async(lambda _loop: _with_dlqs(bus, pairs, peek))
        if as_json or output == OutputFormat.json:
            print_json({dlq.name: [_dead_letter_dict(d) for d in dead] for dlq, dead in found})
            return
        for dlq, dead_letters in found:
            if dead_letters:
                out.print(_list_table(dlq, dead_letters))
            else:
                out.print(f"{markup(dlq.name)}: empty", soft_wrap=True)


@app.command("show")
def dlq_show(
    ctx: typer.Context,
    target: TargetArg,
    ref: Annotated[str, typer.Argument(help="Message id (or the ref `dlq list` shows).")],
    message_type: Annotated[
        str | None,
        typer.Option("--type", help="Message type (default: look in every DLQ of the service)."),
    ] = None,
    group: GroupOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = OutputFormat.table,
    url: UrlOpt = None,
) -> None:
    """Show one dead-lettered message in full: reason, error, headers, traceback, envelope."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = _load(target, url)
        pairs = _dlq_targets(bus, group, message_type)

        async def find(dlq: DeadLetterQueue) -> DeadLetter | None:
            found = await dlq.find(ref)
            if found is None:  # the ref as `dlq list` printed it, control characters gone
                found = next((d for d in await dlq.list(10_000) if markup(d.ref) == ref), None)
            return found

        hits = [(q, d) for q, d in run_async(lambda _loop: _with_dlqs(bus, pairs, find)) if d]
        if not hits:
            where = pairs[0][1] if len(pairs) == 1 else f"any of {len(pairs)} dead-letter queues"
            raise CliError(f"no message {ref!r} in the DLQ of {where}", EXIT_FAILURE)
        _, dead = hits[0]
        data = _dead_letter_dict(dead)
        if as_json or output == OutputFormat.json:
            print_json(data)
            return
        traceback, envelope = data.pop("traceback"), data.pop("envelope")
        headers = data.pop("headers")
        for key, value in data.items():
            out.print(f"[bold]{key}[/bold]: {markup(value)}", soft_wrap=True)
        out.print("[bold]headers[/bold]:")
        for key, value in headers.items():
            out.print(f"  {markup(key)}: {markup(value)}", soft_wrap=True)
        if traceback:
            out.print("[bold]traceback[/bold]:")
            out.print(markup(traceback, lines=True), soft_wrap=True)
        out.print("[bold]envelope[/bold]:")
        text = json.dumps(envelope, indent=2, ensure_ascii=True, default=str)
        out.print(markup(text, lines=True), soft_wrap=True)


@app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    target: TargetArg,
    message_type: TypeOpt = None,
    group: GroupOpt = None,
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="Replay this message (repeatable).")
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Replay every message.")] = False,
    keep_progress: Annotated[
        bool,
        typer.Option(
            "--keep-progress",
            help="Skip the handlers the record says had succeeded (x-banyan-handled); "
            "by default every handler runs again.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
) -> None:
    """Send dead-lettered messages back to their group (only that group sees them)."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = _load(target, url)
        pairs = _only_one(bus, _dlq_targets(bus, group, message_type))
        chosen = _choose_ids(ids, everything, "replay")
        [(dlq, result)] = run_async(
            lambda _loop: _with_dlqs(
                bus, pairs, lambda q: q.replay(ids=chosen, keep_progress=keep_progress)
            )
        )
        if as_json:
            data = {"replayed": result.replayed, "failed": result.failed, "missing": result.missing}
            print_json(data)
        else:
            out.print(f"replayed {len(result.replayed)} message(s) from {dlq.name}", soft_wrap=True)
            for ref, why in result.failed.items():
                err.print(f"not replayed {markup(ref)}: {markup(why)}", soft_wrap=True)
            for ref in result.missing:
                err.print(f"not found: {markup(ref)}", soft_wrap=True)
        if not result.ok:
            raise typer.Exit(EXIT_FAILURE)


@app.command("purge")
def dlq_purge(
    ctx: typer.Context,
    target: TargetArg,
    message_type: TypeOpt = None,
    group: GroupOpt = None,
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="Delete this message (repeatable).")
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Delete every message.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOpt = None,
) -> None:
    """Delete dead-lettered messages for good."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = _load(target, url)
        pairs = _only_one(bus, _dlq_targets(bus, group, message_type))
        chosen = _choose_ids(ids, everything, "purge")
        what = "every message" if chosen is None else f"{len(chosen)} message(s)"
        if not yes and not typer.confirm(f"Delete {what} from the DLQ of {pairs[0][0]}?"):
            raise typer.Abort()
        [(dlq, dropped)] = run_async(
            lambda _loop: _with_dlqs(bus, pairs, lambda q: q.purge(ids=chosen))
        )
        out.print(f"deleted {dropped} message(s) from {dlq.name}", soft_wrap=True)
