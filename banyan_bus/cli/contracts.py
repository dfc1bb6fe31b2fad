"""``banyan contracts snapshot|check``: the compatibility gate for CI.

::

    banyan contracts snapshot myservice.app:bus      # writes contracts.snapshot.json
    banyan contracts check myservice.app:bus         # exit 1 on a breaking change

The snapshot holds the JSON Schema of every contract the service imports;
commit it with each release. ``check`` prints one line per breaking change to
an existing (type, version) and exits 1; additive optional fields and new
versions pass (exit 0) and are listed. The rules are in ``banyan_bus.compat``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from banyan_bus.cli.errors import EXIT_FAILURE, CliError, reported
from banyan_bus.cli.output import configure_logging, err, markup, options, out
from banyan_bus.cli.targets import load_bus

app = typer.Typer(
    help="Snapshot a service's contracts and check changes against the snapshot (CI gate).",
    no_args_is_help=True,
)


@app.command()
def snapshot(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="module:bus whose contracts to record")],
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="The snapshot file (commit it).")
    ] = Path("contracts.snapshot.json"),
) -> None:
    """Write the JSON Schemas of the service's contracts to a file for version control."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        from banyan_bus.compat import write_snapshot

        bus = load_bus(target)
        data = write_snapshot(out_file, list(bus.contracts))
        count = len(data["contracts"])
        out.print(markup(f"wrote {count} contract version(s) to {out_file}"), soft_wrap=True)


@app.command()
def check(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="module:bus whose contracts to check")],
    snapshot_file: Annotated[
        Path, typer.Option("--snapshot", "-s", help="The snapshot to check against.")
    ] = Path("contracts.snapshot.json"),
) -> None:
    """Compare the service's contracts to the snapshot; exit 1 on a breaking change."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        from banyan_bus.compat import compare, read_snapshot, snapshot

        if not snapshot_file.exists():
            raise CliError(
                f"no snapshot at {snapshot_file}; write one with "
                f"`banyan contracts snapshot {target} --out {snapshot_file}` and commit it"
            )
        try:
            before = read_snapshot(snapshot_file)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        bus = load_bus(target)
        report = compare(before, snapshot(list(bus.contracts)))
        for problem in report.problems:
            out.print(markup(f"breaking: {problem}"), soft_wrap=True)
        for addition in report.additions:
            out.print(markup(f"added: {addition}"), soft_wrap=True)
        if not report.ok:
            err.print(
                markup(
                    f"{len(report.problems)} breaking change(s) against {snapshot_file}: keep "
                    f"the released version as it was and put the change in a new version"
                ),
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_FAILURE)
        out.print(markup(f"compatible with {snapshot_file}"), soft_wrap=True)
