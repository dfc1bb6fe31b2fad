"""The wire envelope (DESIGN.md §2): encode once on publish, decode once on consume.

The hot path decodes in one pydantic pass straight from bytes: the AMQP
``type`` property and ``x-version`` header name the contract before the body
is read, so a per-contract envelope model validates header fields and payload
together. Anything unusual (no properties, a foreign publisher's bare JSON
payload, a broken body) takes the slow path, which also classifies *why* a
message cannot be decoded, so the dead-letter queue can say so.

**Hostile input.** Whatever a delivery holds, :func:`decode` returns an
``Envelope`` or raises ``DecodeError`` — never anything else (an exception
from the parser or from a contract's own validator becomes ``undecodable``),
so the consumer dead-letters the message at once instead of requeueing it.
Limits, each refused as ``undecodable`` with the field named:

- ``id``, ``correlationId``, ``causationId``, ``messageType`` and ``serviceName``:
  at most :data:`MAX_FIELD_LENGTH` (256) characters; the ``traceContext`` fields
  at most :data:`MAX_TRACE_FIELD_LENGTH` (64); ``version`` within 0 .. 2^31-1;
- nesting: both paths parse with pydantic-core's JSON parser (Rust, no Python
  recursion), which refuses arrays/objects nested deeper than
  :data:`MAX_JSON_DEPTH` levels — a body of 100,000 ``[`` is refused at once.
  It is that parser's fixed limit: checking a lower one ourselves would mean a
  scan of every body on the hot path;
- the body size is the consumer's limit (``max_message_size``, 256 KiB);
- a delivery whose AMQP properties the transport could not all decode carries
  the header ``x-banyan-undecodable`` (``transport/amqp_frames.py``) and is
  refused with what it says.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.alias_generators import to_camel

from banyan_bus.contracts import ContractRegistry, Message
from banyan_bus.errors import PayloadTooLarge
from banyan_bus.transport.amqp_frames import HEADER_UNDECODABLE
from banyan_bus.transport.base import Delivery, Headers, OutgoingMessage
from banyan_bus.wire import format_timestamp as format_timestamp  # re-exported
from banyan_bus.wire import unmark_decimals

CONTENT_TYPE = "application/json"
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024

HEADER_VERSION = "x-version"
HEADER_ATTEMPT = "x-attempt"
HEADER_PARTITION_KEY = "x-partition-key"
HEADER_DELAY = "x-banyan-delay"
HEADER_TRACEPARENT = "traceparent"
HEADER_TRACESTATE = "tracestate"

#: Longest id, correlation/causation id, message type and service name accepted.
MAX_FIELD_LENGTH = 256
#: Longest ``traceContext`` field accepted (W3C: 32, 16 and 2 hex digits).
MAX_TRACE_FIELD_LENGTH = 64
#: Deepest nesting of arrays/objects in a body: pydantic-core's parser refuses more.
MAX_JSON_DEPTH = 200

_Field = Annotated[str, Field(max_length=MAX_FIELD_LENGTH)]
_TraceField = Annotated[str, Field(max_length=MAX_TRACE_FIELD_LENGTH)]

Priority = Literal["low", "normal", "high"]
#: AMQP priorities; a classic queue is declared with x-max-priority = PRIORITY_MAX.
PRIORITY_LEVELS: dict[str, int] = {"low": 1, "normal": 2, "high": 3}
PRIORITY_MAX = 3

_ID_PREFIX = {"event": "evt_", "command": "cmd_", "query": "qry_"}


def new_id(prefix: str) -> str:
    """``prefix`` + 32 random hex digits (a UUID's entropy without building a UUID)."""
    return prefix + os.urandom(16).hex()


class TraceContext(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True)

    trace_id: _TraceField
    span_id: _TraceField
    trace_flags: _TraceField = "01"


class EnvelopeHeader(BaseModel):
    """Every envelope field but the payload; the base of the per-contract models."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, extra="ignore")

    id: _Field
    correlation_id: _Field | None = None
    causation_id: _Field | None = None
    trace_context: TraceContext | None = None
    timestamp: datetime
    service_name: _Field | None = None
    message_type: _Field
    version: Annotated[int, Field(ge=0, lt=2**31)] = 1
    metadata: dict[str, Any] = {}


class _RawEnvelope(EnvelopeHeader):
    payload: Any


_typed_models: dict[type[Message], type[EnvelopeHeader]] = {}


def _typed_model(contract: type[Message]) -> type[EnvelopeHeader]:
    model = _typed_models.get(contract)
    if model is None:
        model = create_model(  # one model per contract, built once
            f"Envelope[{contract.__name__}]",
            __base__=EnvelopeHeader,
            payload=(contract, ...),
        )
        _typed_models[contract] = model
    return model


@dataclass(slots=True)
class Envelope:
    """A decoded message: envelope fields, the typed payload, and its AMQP headers."""

    id: str
    message_type: str
    version: int
    payload: Message
    timestamp: datetime
    correlation_id: str | None = None
    causation_id: str | None = None
    service_name: str | None = None
    trace_context: TraceContext | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    headers: Headers = field(default_factory=dict)


DecodeFailure = Literal[
    "undecodable", "unknown-message-type", "unknown-version", "validation-failed", "too-large"
]


class DecodeError(Exception):
    """Why a delivery cannot become an ``Envelope``; carries the DLQ reason."""

    def __init__(
        self,
        reason: DecodeFailure,
        detail: str,
        *,
        message_type: str | None = None,
        version: int | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.message_type = message_type
        self.version = version
        self.cause = cause


def encode(
    message: Message,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    service_name: str,
    timestamp: datetime | None = None,
    trace_context: dict[str, str] | None = None,
    priority: Priority = "normal",
    headers: Headers | None = None,
    metadata: dict[str, Any] | None = None,
    max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> OutgoingMessage:
    """Build the envelope body and AMQP properties of ``message``.

    Raises ``PayloadTooLarge`` when the body exceeds ``max_size``; nothing is sent.
    """
    cls = type(message)
    message_type = cls.__message_type__
    version = cls.__message_version__
    if message_id is None:
        message_id = new_id(_ID_PREFIX[cls.__message_kind__])
    if correlation_id is None:
        correlation_id = new_id("cor_")
    if timestamp is None:
        timestamp = datetime.now(UTC)
    if priority not in PRIORITY_LEVELS:
        raise ValueError(f"priority must be one of {sorted(PRIORITY_LEVELS)}, got {priority!r}")
    tail = _envelope_tail(cls, service_name, priority, metadata)
    payload = unmark_decimals(cls.__pydantic_serializer__.to_json(message, by_alias=True))
    # The head is written by hand (json.dumps of a dict cost 5 µs per publish);
    # strings go through json's own escaper, so the bytes are what json.dumps writes.
    body = (
        (
            f'{{"id":{_js(message_id)},"correlationId":{_js(correlation_id)},'
            f'"causationId":{"null" if causation_id is None else _js(causation_id)},'
            f'"traceContext":{"null" if trace_context is None else _compact(trace_context)},'
            f'"timestamp":"{format_timestamp(timestamp)}",'
        ).encode()
        + tail
        + payload
        + b"}"
    )
    if len(body) > max_size:
        raise PayloadTooLarge(message_type, len(body), max_size)
    amqp_headers: Headers = {HEADER_VERSION: version}
    if headers:
        amqp_headers.update(headers)
    return OutgoingMessage(
        body=body,
        message_id=message_id,
        correlation_id=correlation_id,
        message_type=message_type,
        timestamp=timestamp,
        headers=amqp_headers,
        priority=PRIORITY_LEVELS[priority],
        content_type=CONTENT_TYPE,
    )


_js = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str (ensure_ascii)
_tails: dict[tuple[type[Message], str, str], bytes] = {}


def _compact(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"))``. A dict of strings (the trace
    context every publish carries) is written by hand, with json's own escaper: the
    same text, without building a JSON encoder per call (≈ 5 µs per publish here)."""
    if type(value) is dict:
        parts = []
        for key, item in value.items():
            if type(key) is not str or type(item) is not str:
                break
            parts.append(f"{_js(key)}:{_js(item)}")
        else:
            return "{" + ",".join(parts) + "}"
    return json.dumps(value, separators=(",", ":"))


def _envelope_tail(
    cls: type[Message], service_name: str, priority: str, metadata: dict[str, Any] | None
) -> bytes:
    """``"serviceName":…,"messageType":…,"version":…,"metadata":…,"payload":`` — the
    same for every message of one contract, service and priority, so built once."""
    key = (cls, service_name, priority)
    tail = None if metadata else _tails.get(key)
    if tail is None:
        meta: dict[str, Any] = {"routing": {"priority": priority}}
        if metadata:
            meta.update(metadata)
        tail = (
            f'"serviceName":{_js(service_name)},"messageType":{_js(cls.__message_type__)},'
            f'"version":{cls.__message_version__},"metadata":{_compact(meta)},"payload":'
        ).encode()
        if not metadata:
            _tails[key] = tail
    return tail


def _header_int(headers: Headers, name: str) -> int | None:
    value = headers.get(name)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (str, bytes)):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def decode(delivery: Delivery, registry: ContractRegistry) -> Envelope:
    """Turn a delivery into an ``Envelope`` or raise ``DecodeError`` saying why not.

    Raises nothing else: whatever goes wrong reading a body is ``undecodable``.
    """
    headers = delivery.headers
    if HEADER_UNDECODABLE in headers:
        raise DecodeError(
            "undecodable",
            f"AMQP properties could not be decoded: {headers[HEADER_UNDECODABLE]}",
        )
    try:
        return _decode(delivery, registry)
    except DecodeError:
        raise
    except Exception as exc:  # a parser or validator failing any other way
        detail = str(exc)[:500] or "no detail"
        raise DecodeError(
            "undecodable", f"body cannot be decoded: {type(exc).__name__}: {detail}", cause=exc
        ) from exc


def _decode(delivery: Delivery, registry: ContractRegistry) -> Envelope:
    message_type = delivery.message_type
    version = _header_int(delivery.headers, HEADER_VERSION)
    if message_type and version is not None:
        contract = registry.get(message_type, version)
        if contract is not None:
            try:
                if has_decimals(contract):
                    exact = json.loads(delivery.body, parse_float=Decimal)
                    model = _typed_model(contract).model_validate(exact)
                else:
                    model = _typed_model(contract).model_validate_json(delivery.body)
            except Exception:  # the slow path says exactly what is wrong
                pass
            else:
                return Envelope(
                    id=model.id,
                    message_type=model.message_type,
                    version=model.version,
                    payload=model.payload,  # type: ignore[attr-defined]  # built by create_model
                    timestamp=model.timestamp,
                    correlation_id=model.correlation_id,
                    causation_id=model.causation_id,
                    service_name=model.service_name,
                    trace_context=model.trace_context,
                    metadata=model.metadata,
                    headers=delivery.headers,
                )
    return _decode_slow(delivery, registry)


def _decode_slow(delivery: Delivery, registry: ContractRegistry) -> Envelope:
    try:
        # pydantic-core's parser, as on the fast path: the same JSON is accepted, and
        # its nesting limit (MAX_JSON_DEPTH) holds without recursion in Python.
        data = pydantic_core.from_json(delivery.body)
    except ValueError as exc:
        text = str(exc)
        if "recursion limit" in text:
            raise DecodeError(
                "undecodable",
                f"body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels ({text})",
                cause=exc,
            ) from exc
        raise DecodeError("undecodable", f"body is not JSON: {text}", cause=exc) from exc
    if isinstance(data, dict) and "payload" in data and "messageType" in data:
        try:
            raw = _RawEnvelope.model_validate(data)
        except ValidationError as exc:
            raise DecodeError(
                "undecodable", f"body is not a valid envelope: {exc}", cause=exc
            ) from exc
        return _typed(delivery, registry, raw, raw.payload, enveloped=True)
    # A foreign publisher: AMQP properties carry the metadata, the body is the payload.
    if not delivery.message_type:
        raise DecodeError(
            "undecodable",
            "body is neither an envelope nor a payload with an AMQP 'type' property",
        )
    raw = _RawEnvelope(
        id=delivery.message_id or new_id("ext_"),
        correlation_id=delivery.correlation_id,
        timestamp=delivery.timestamp or datetime.now(UTC),
        message_type=delivery.message_type,
        version=_header_int(delivery.headers, HEADER_VERSION) or 1,
        payload=data,
    )
    return _typed(delivery, registry, raw, data, enveloped=False)


def has_decimals(contract: type[Message]) -> bool:
    """Whether ``contract`` has a Decimal anywhere (nested models and containers too).

    pydantic reads a JSON number through a float, which keeps about 17 digits; a
    contract with decimals is read with Python's parser and ``parse_float=Decimal``
    instead, so ``12345678901234567.89`` arrives with every digit it was sent with.
    Worked out once per contract.
    """
    found = _decimal_contracts.get(contract)
    if found is None:
        found = _mentions_decimal(contract.__pydantic_core_schema__)
        _decimal_contracts[contract] = found
    return found


_decimal_contracts: dict[type[Message], bool] = {}


def _mentions_decimal(schema: Any) -> bool:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "decimal":
                return True
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


def _typed(
    delivery: Delivery,
    registry: ContractRegistry,
    raw: _RawEnvelope,
    payload: Any,
    *,
    enveloped: bool,
) -> Envelope:
    versions = registry.versions(raw.message_type)
    if not versions:
        raise DecodeError(
            "unknown-message-type",
            f"no contract is registered for message type {raw.message_type!r}",
            message_type=raw.message_type,
            version=raw.version,
        )
    contract = versions.get(raw.version)
    if contract is None:
        raise DecodeError(
            "unknown-version",
            f"{raw.message_type} version {raw.version} has no contract here "
            f"(known versions: {sorted(versions)})",
            message_type=raw.message_type,
            version=raw.version,
        )
    if has_decimals(contract):  # the body parsed once more, decimals exact (see has_decimals)
        exact = json.loads(delivery.body, parse_float=Decimal)
        payload = exact["payload"] if enveloped else exact
    try:
        model = contract.model_validate(payload)
    except ValidationError as exc:
        raise DecodeError(
            "validation-failed",
            f"payload does not match {contract.__name__}: {exc}",
            message_type=raw.message_type,
            version=raw.version,
            cause=exc,
        ) from exc
    return Envelope(
        id=raw.id,
        message_type=raw.message_type,
        version=raw.version,
        payload=model,
        timestamp=raw.timestamp,
        correlation_id=raw.correlation_id,
        causation_id=raw.causation_id,
        service_name=raw.service_name,
        trace_context=raw.trace_context,
        metadata=raw.metadata,
        headers=delivery.headers,
    )
