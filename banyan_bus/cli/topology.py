"""``banyan topology``: the exchanges, queues and bindings a service declares."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from banyan_bus.cli.errors import reported
from banyan_bus.cli.output import configure_logging, err, options, out
from banyan_bus.cli.targets import connect, load_bus, run_async

if TYPE_CHECKING:
    from banyan_bus.topology import Declaration


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
        table.add_row(*(escape(str(cell)) for cell in row))
    return table


def topology(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="module:bus")],
    declare: Annotated[
        bool, typer.Option("--declare", help="Declare it on the broker now (before a deploy).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show the exchanges, queues and bindings the service declares (and declare them)."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = load_bus(target)
        plan = bus.topology()
        if as_json:
            out.print_json(json.dumps([declaration_dict(d) for d in plan], default=str))
        else:
            out.print(_topology_table(bus.service, plan))
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
