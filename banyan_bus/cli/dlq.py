"""``banyan dlq list|show|replay|purge``: inspect and operate a service's dead-letter queues.

A DLQ belongs to one (subscription group, message type). ``--type`` alone
means the group that subscribes to that type here; no option at all means
every subscription of the service.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from banyan_bus.cli.errors import EXIT_FAILURE, CliError, reported
from banyan_bus.cli.output import configure_logging, err, options, out
from banyan_bus.cli.targets import connect, load_bus, run_async

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

    transport = await connect(bus, "dlq")
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


def _list_table(found: list[tuple[DeadLetterQueue, list[DeadLetter]]]) -> Table:
    table = Table(title_justify="left")
    for column in ("queue", "ref", "type", "v", "reason", "tries", "last failure", "error"):
        table.add_column(column, overflow="fold")
    for dlq, dead_letters in found:
        for dead in dead_letters:
            error = (
                f"{dead.exception_type}: {dead.exception_message}" if dead.exception_type else ""
            )
            last = dead.last_failure.isoformat(timespec="seconds") if dead.last_failure else ""
            cells = (
                dlq.name,
                dead.ref,
                dead.message_type or "?",
                dead.version or "?",
                dead.reason,
                dead.attempts,
                last,
                error[:120],
            )
            table.add_row(*(escape(str(cell)) for cell in cells))
    total = sum(len(d) for _, d in found)
    table.title = f"{total} dead-lettered message(s) in {len(found)} queue(s)"
    return table


TargetArg = Annotated[str, typer.Argument(help="module:bus")]
GroupOpt = Annotated[
    str | None, typer.Option("--group", help="Subscription group (default: the one subscribed).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


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
) -> None:
    """List dead-lettered messages (they stay in the queue)."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = load_bus(target)
        pairs = _dlq_targets(bus, group, message_type)

        async def peek(dlq: DeadLetterQueue) -> list[DeadLetter]:
            return await dlq.list(limit)

        found = run_async(lambda _loop: _with_dlqs(bus, pairs, peek))
        if as_json:
            data = {dlq.name: [_dead_letter_dict(d) for d in dead] for dlq, dead in found}
            out.print_json(json.dumps(data, default=str))
            return
        out.print(_list_table(found))


@app.command("show")
def dlq_show(
    ctx: typer.Context,
    target: TargetArg,
    ref: Annotated[str, typer.Argument(help="Message id (or the ref `dlq list` shows).")],
    message_type: Annotated[str, typer.Option("--type", help="Message type.")],
    group: GroupOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one dead-lettered message in full: reason, error, traceback, envelope."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = load_bus(target)
        pairs = _dlq_targets(bus, group, message_type)

        async def find(dlq: DeadLetterQueue) -> DeadLetter | None:
            return await dlq.find(ref)

        [(dlq, dead)] = run_async(lambda _loop: _with_dlqs(bus, pairs, find))
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


@app.command("replay")
def dlq_replay(
    ctx: typer.Context,
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
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = load_bus(target)
        pairs = _dlq_targets(bus, group, message_type)
        chosen = _choose_ids(ids, everything, "replay")
        [(dlq, result)] = run_async(
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


@app.command("purge")
def dlq_purge(
    ctx: typer.Context,
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
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = load_bus(target)
        pairs = _dlq_targets(bus, group, message_type)
        chosen = _choose_ids(ids, everything, "purge")
        what = "every message" if chosen is None else f"{len(chosen)} message(s)"
        if not yes and not typer.confirm(f"Delete {what} from the DLQ of {pairs[0][0]}?"):
            raise typer.Abort()
        [(dlq, dropped)] = run_async(
            lambda _loop: _with_dlqs(bus, pairs, lambda q: q.purge(ids=chosen))
        )
        out.print(f"deleted {dropped} message(s) from {dlq.name}", soft_wrap=True)
