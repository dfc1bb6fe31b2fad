"""``banyan asyncapi``: the service's AsyncAPI 3.0 document."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from banyan_bus.cli.errors import reported
from banyan_bus.cli.output import configure_logging, err, options
from banyan_bus.cli.targets import find_contract, load_bus
from banyan_bus.contracts import Event


def asyncapi(
    ctx: typer.Context,
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
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        from banyan_bus.asyncapi import asyncapi_document

        bus = load_bus(target)
        events: list[type[Event]] | None = None
        if publishes:
            events = [find_contract(bus.contracts, name, None) for name in publishes]
        document = asyncapi_document(bus, publishes=events, version=api_version)
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        if output is None:
            sys.stdout.write(text)
        else:
            output.write_text(text, encoding="utf-8")
            err.print(f"wrote {output}", soft_wrap=True)
