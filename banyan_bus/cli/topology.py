"""``banyan topology``: the exchanges, queues and bindings a service declares.

The table shows the service's own part first (its groups' exchanges, queues,
DLQs and bindings, its command queues), then the shared root exchanges; the
delay infrastructure every service shares (28 levels) is one summary line
unless ``--all``. ``--json`` is always the whole plan.

``--prune`` compares the broker with the plan: queues and exchanges named for
one of the service's groups (``exchange.platform.events.{group}.*`` and their
``dlq.`` queues) that the service no longer declares are listed, and deleted
with ``--yes`` when empty and unused (``--force``: regardless). Listing needs
the management API (``management.py``); shared infrastructure is never pruned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from banyan_bus.cli.errors import CliError, reported
from banyan_bus.cli.output import configure_logging, err, markup, options, out, print_json
from banyan_bus.cli.targets import broker_url, connect, load_bus, run_async

if TYPE_CHECKING:
    from banyan_bus.bus import MessageBus
    from banyan_bus.topology import Declaration
    from banyan_bus.transport.base import Transport


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


def _shared_delay(decl: Declaration) -> bool:
    """Part of the delay infrastructure every service shares (levels, delivery exchange)."""
    from banyan_bus.delay import DELIVERY_EXCHANGE, LEVEL_PREFIX

    def shared(name: str) -> bool:
        return name.startswith(LEVEL_PREFIX) or name == DELIVERY_EXCHANGE

    data = declaration_dict(decl)
    if data["kind"] != "binding":
        return shared(data["name"])
    # A binding from the delivery exchange to the service's own exchange is the service's.
    destination = data["destination"]
    return shared(data["source"]) and (shared(destination) or _is_root(destination))


def _is_root(name: str) -> bool:
    from banyan_bus.topology import COMMANDS_EXCHANGE, ROOT_EXCHANGE

    return name in (ROOT_EXCHANGE, COMMANDS_EXCHANGE)


def _ordered(plan: list[Declaration]) -> tuple[list[Declaration], list[Declaration]]:
    """(the service's own declarations, then the shared root exchanges; the delay part)."""
    unique = {json.dumps(declaration_dict(d), sort_keys=True, default=str): d for d in plan}
    plan = list(unique.values())  # the commands exchange comes with every command
    delay = [d for d in plan if _shared_delay(d)]
    rest = [d for d in plan if not _shared_delay(d)]
    roots = [d for d in rest if _is_root(declaration_dict(d).get("name", ""))]
    own = [d for d in rest if d not in roots]
    return own + roots, delay


def _delay_summary(delay: list[Declaration]) -> str:
    counts = {kind: 0 for kind in ("exchange", "queue", "binding")}
    for decl in delay:
        counts[declaration_dict(decl)["kind"]] += 1
    return (
        f"+ shared delay infrastructure (banyan.delay.*): {counts['exchange']} exchanges, "
        f"{counts['queue']} queues, {counts['binding']} bindings; --all lists them"
    )


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
            queue_type = str(args.get("x-queue-type", "classic"))
            row = ("queue", data["name"], queue_type, _arguments_text(args))
        else:
            key = data["routing_key"]
            row = (
                "binding",
                f"{data['source']} → {data['destination']}",
                data["destination_kind"],
                f"routing key {key!r}" if key else "(no routing key)",
            )
        table.add_row(*(markup(cell, lines=True) for cell in row))
    return table


@dataclass
class Stale:
    """Something on the broker named for one of the service's groups that it no longer declares."""

    kind: str
    name: str
    messages: int | None = None
    consumers: int | None = None
    action: str = ""


def _stale(
    bus: MessageBus, plan: list[Declaration], groups: list[str], root: str | None
) -> list[Stale]:
    from banyan_bus.cli.management import Management
    from banyan_bus.topology import DLQ_PREFIX, ROOT_EXCHANGE

    declared = {declaration_dict(d).get("name") for d in plan}
    prefixes = tuple(
        p for g in groups for p in (f"{ROOT_EXCHANGE}.{g}.", f"{DLQ_PREFIX}{ROOT_EXCHANGE}.{g}.")
    )
    api = Management.for_url(bus.url, root)
    found = [Stale("queue", n) for n in api.queues() if n.startswith(prefixes)]
    found += [Stale("exchange", n) for n in api.exchanges() if n.startswith(prefixes)]
    return sorted((s for s in found if s.name not in declared), key=lambda s: (s.name, s.kind))


async def _prune(transport: Transport, stale: list[Stale], *, delete: bool, force: bool) -> None:
    """Count each stale queue's messages (exactly, passively); delete what may go.

    Queues first, so an exchange goes only after the queue of the same name.
    """
    for item in (s for s in stale if s.kind == "queue"):
        state = await transport.queue_state(item.name)
        if state is None:
            item.action = "gone"
            continue
        item.messages, item.consumers = state.messages, state.consumers
        busy = []
        if state.messages:
            busy.append(f"{state.messages} message(s)")
        if state.consumers:
            busy.append(f"{state.consumers} consumer(s)")
        if not delete:
            item.action = "would delete" if not busy else f"would keep: {', '.join(busy)}"
        elif busy and not force:
            item.action = f"kept: {', '.join(busy)} (--force deletes)"
        else:
            await transport.delete_queue(item.name)
            item.action = "deleted"
    for item in (s for s in stale if s.kind == "exchange"):
        if not delete:
            item.action = "would delete"
        elif any(q.name == item.name and q.action.startswith("kept") for q in stale):
            item.action = "kept: its queue is kept"
        else:
            await transport.delete_exchange(item.name)
            item.action = "deleted"


def _prune_report(bus: MessageBus, stale: list[Stale], *, delete: bool, as_json: bool) -> None:
    if as_json:
        print_json([vars(item) for item in stale])
        return
    if not stale:
        out.print(
            f"nothing to prune: {markup(bus.service)} declares everything it has", soft_wrap=True
        )
        return
    table = Table(title=f"on the broker, no longer declared by {bus.service}", title_justify="left")
    table.add_column("kind", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("messages", justify="right", no_wrap=True)
    table.add_column("consumers", justify="right", no_wrap=True)
    table.add_column("action", overflow="fold")
    for item in stale:
        numbers = ["" if n is None else str(n) for n in (item.messages, item.consumers)]
        table.add_row(item.kind, markup(item.name), *numbers, markup(item.action))
    out.print(table)
    if not delete:
        err.print("dry run: --yes deletes the empty, unused ones (--force: all of them)")


def topology(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="module:bus")],
    declare: Annotated[
        bool, typer.Option("--declare", help="Declare it on the broker now (before a deploy).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    everything: Annotated[
        bool, typer.Option("--all", help="List the shared delay infrastructure too.")
    ] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="List what the broker has for the service's groups "
            "that it no longer declares (delete it with --yes).",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With --prune: delete.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="With --prune --yes: delete non-empty queues too.")
    ] = False,
    groups: Annotated[
        list[str] | None,
        typer.Option("--group", help="With --prune: also look at this retired group (repeat)."),
    ] = None,
    management_url: Annotated[
        str | None,
        typer.Option(help="With --prune: the management API (default: broker host, :15672)."),
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="Broker URL (default: the bus's, BANYAN_URL).")
    ] = None,
) -> None:
    """Show the exchanges, queues and bindings the service declares (and declare them)."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = load_bus(target, url)
        plan = bus.topology()
        if (yes or force or groups) and not prune:
            raise CliError("--yes, --force and --group go with --prune")
        if prune:
            broker_url(bus, "topology --prune", url)
            from banyan_bus.topology import check_group_name

            wanted = [bus.service, *(s.group for s in bus.subscriptions)]
            wanted += [check_group_name(g) for g in groups or []]
            stale = _stale(bus, plan, list(dict.fromkeys(wanted)), management_url)

            async def prune_all(_loop: str) -> None:
                transport = await connect(bus, "prune")
                try:
                    await _prune(transport, stale, delete=yes, force=force)
                finally:
                    await transport.close()

            run_async(prune_all)
            _prune_report(bus, stale, delete=yes, as_json=as_json)
            return
        if as_json:
            print_json([declaration_dict(d) for d in plan])
        else:
            shown, delay = _ordered(plan)
            out.print(_topology_table(bus.service, shown + (delay if everything else [])))
            if delay and not everything:
                out.print(_delay_summary(delay), soft_wrap=True)
        if declare:
            from banyan_bus.topology import apply

            async def declare_all(_loop: str) -> str:
                transport = await connect(bus, "topology")
                try:
                    await apply(transport, plan)
                finally:
                    await transport.close()
                return transport.display_url

            where = run_async(declare_all)
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
