"""``banyan publish``: validate an event against the service's contract and publish it."""

from __future__ import annotations

import enum
import json
import logging
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from banyan_bus.cli.errors import CliError, describe_validation, reported
from banyan_bus.cli.output import configure_logging, options, out
from banyan_bus.cli.targets import find_contract, load_bus, run_async


class PriorityName(enum.StrEnum):
    low = "low"
    normal = "normal"
    high = "high"


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


def publish(
    ctx: typer.Context,
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
    opts = options(ctx)
    configure_logging(opts, logging.WARNING)
    with reported(debug=opts.debug):
        bus = load_bus(target)
        contract = find_contract(bus.contracts, message_type, version)
        delay = _parse_after(after)
        try:
            event = contract.model_validate(_parse_payload(payload))
        except ValidationError as exc:
            what = f"{contract.__message_type__} v{contract.__message_version__}"
            raise CliError(describe_validation(exc, what)) from exc

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

        message_id = run_async(send)
    out.print(message_id, soft_wrap=True)
