"""``banyan publish``: validate an event against the service's contract and publish it.

The payload is the JSON text itself, ``@path`` (a file) or ``-`` (stdin): an
argument is limited by the OS (~128 KiB on Linux), a file is not.
"""

from __future__ import annotations

import enum
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from banyan_bus.cli.errors import CliError, describe_validation, reported
from banyan_bus.cli.output import configure_logging, err, markup, options, out
from banyan_bus.cli.targets import broker_url, find_contract, load_bus, run_async

if TYPE_CHECKING:
    from banyan_bus.bus import MessageBus
    from banyan_bus.contracts import Event


class PriorityName(enum.StrEnum):
    low = "low"
    normal = "normal"
    high = "high"


def _read_payload(payload: str) -> tuple[str, str]:
    """The payload text and what to call it in an error: the argument, ``@file`` or stdin."""
    if payload == "-":
        return sys.stdin.read(), "stdin"
    if payload.startswith("@"):
        path = Path(payload[1:])
        try:
            return path.read_text(encoding="utf-8"), f"file {str(path)!r}"
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise CliError(f"cannot read payload file {str(path)!r}: {reason}") from exc
    return payload, "payload"


def _parse_payload(payload: str) -> dict[str, Any]:
    text, source = _read_payload(payload)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        quoted = text if len(text) <= 60 else text[:57] + "..."
        what = f"payload {quoted!r}" if source == "payload" else f"payload from {source}"
        raise CliError(f"{what} is not valid JSON: {exc}") from exc
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
        raise CliError(f"--after {after!r}: {exc}") from exc
    return value


def _default_version(bus: MessageBus, message_type: str) -> int | None:
    """What ``publish`` sends without ``--version``: the version the service pins
    (``publish_versions``), else v1 (else the oldest), never blindly the latest: the
    latest may be one the subscribers do not read yet."""
    pinned = bus.pinned_contracts.get(message_type)
    if pinned is not None:
        return pinned.__message_version__
    versions = bus.contracts.versions(message_type)
    return min(versions) if versions else None


def _sent(bus: MessageBus, contract: type[Event], *, explicit: bool) -> str:
    """The note on stderr saying which version went out, and why that one."""
    message_type, version = contract.__message_type__, contract.__message_version__
    if explicit:
        why = "as --version said"
    elif message_type in bus.pinned_contracts:
        why = "the version the service pins"
    else:
        why = "the contract's default"
    latest = max(bus.contracts.versions(message_type))
    newer = f"; the latest is v{latest} (--version {latest})" if latest > version else ""
    return f"sent {message_type} v{version} ({why}{newer})"


def publish(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="module:bus whose contracts to use")],
    message_type: Annotated[str, typer.Argument(help="e.g. UserCreated")],
    payload: Annotated[
        str,
        typer.Argument(
            help="JSON object (camelCase or snake_case keys), @file.json, or - for stdin"
        ),
    ],
    after: Annotated[
        str | None, typer.Option(help="Delay: '10 seconds', '2 hours', ms, or an ISO time.")
    ] = None,
    version: Annotated[
        int | None,
        typer.Option(min=1, help="Contract version (default: the one the bus pins, else 1)."),
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
    url: Annotated[
        str | None, typer.Option("--url", help="Broker URL (default: the bus's, BANYAN_URL).")
    ] = None,
) -> None:
    """Validate an event against its contract and publish it; prints the message id."""
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = load_bus(target, url)
        chosen = version if version is not None else _default_version(bus, message_type)
        contract = find_contract(bus.contracts, message_type, chosen)
        delay = _parse_after(after)
        try:
            event = contract.model_validate(_parse_payload(payload))
        except ValidationError as exc:
            what = f"{contract.__message_type__} v{contract.__message_version__}"
            raise CliError(describe_validation(exc, what)) from exc
        where = broker_url(bus, "publish", url)

        async def send(_loop: str) -> str:
            from banyan_bus.bus import MessageBus

            # A bus of our own, with no subscriptions: starting it must not consume
            # the service's queues. It publishes in the service's name.
            publisher = MessageBus(
                bus.service,
                where,
                stage=bus.stage,
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

        message_id = run_async(send)
    out.print(message_id, soft_wrap=True)
    err.print(markup(_sent(bus, contract, explicit=version is not None)), soft_wrap=True)
