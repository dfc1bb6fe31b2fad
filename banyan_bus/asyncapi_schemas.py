"""JSON Schemas for the AsyncAPI document: every contract, the envelope, the replies.

One pydantic pass over every model (so shared names never collide), in the
wire's forms (``wire.py``: a decimal is a ``number``), with the component keys
AsyncAPI allows, and with what the envelope always carries made required
(``traceContext``). ``asyncapi.py`` assembles the document around them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, create_model
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from banyan_bus.contracts import Message
from banyan_bus.envelope import EnvelopeHeader

SCHEMAS = "#/components/schemas/"
_COMPONENT_KEY = re.compile(r"[^\w.\-]")


class RemoteError(BaseModel):
    """Why a command or query handler failed, as the caller receives it."""

    type: str
    message: str


class ErrorReply(BaseModel):
    """The reply when the handler raised."""

    ok: Literal[False]
    error: RemoteError


def reply_model(contract: type[Message]) -> type[BaseModel]:
    result = contract.__result_type__ if contract.__result_type__ is not None else Any
    model: type[BaseModel] = create_model(
        f"{contract.__message_type__}Reply",
        __doc__=f"The reply to {contract.__message_type__} when its handler succeeded.",
        ok=(Literal[True], ...),
        result=(result, ...),
    )
    return model


def message_key(cls: type[Message]) -> str:
    return f"{cls.__message_type__}.v{cls.__message_version__}"


def summary(cls: type[Any]) -> str | None:
    doc = cls.__dict__.get("__doc__")
    if not isinstance(doc, str) or not doc.strip():
        return None
    return doc.strip().splitlines()[0]


def _rewrite_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite_refs(v, renames) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith(SCHEMAS):
            out["$ref"] = SCHEMAS + renames.get(ref[len(SCHEMAS) :], ref[len(SCHEMAS) :])
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, renames) for v in node]
    return node


class _WireJsonSchema(GenerateJsonSchema):
    """pydantic's JSON Schema in the wire's forms (``banyan_bus/wire.py``).

    A ``Decimal`` is a JSON number with its exact digits, so its schema is ``number``
    (pydantic says ``string``, or ``number`` or ``string``), keeping its bounds.
    """

    def decimal_schema(self, schema: core_schema.DecimalSchema) -> JsonSchemaValue:
        def bound(key: Literal["multiple_of", "le", "ge", "lt", "gt"]) -> float | None:
            value = schema.get(key)
            return None if value is None else float(value)

        number = core_schema.float_schema(
            multiple_of=bound("multiple_of"),
            le=bound("le"),
            ge=bound("ge"),
            lt=bound("lt"),
            gt=bound("gt"),
        )
        return self.float_schema(number)


#: What banyan_bus always writes in ``traceContext``: a W3C trace context, lowercase hex.
_TRACE_FIELDS = {"traceId": 32, "spanId": 16, "traceFlags": 2}


def _require_trace_context(components: dict[str, Any]) -> None:
    """The envelope always carries ``traceContext`` (DESIGN.md §2), all three fields set.

    The decoder accepts an envelope without one (a foreign publisher's), so pydantic
    calls it optional; the document says what the platform's readers can rely on.
    """
    header, trace = components["EnvelopeHeader"], components["TraceContext"]
    header["properties"]["traceContext"] = {
        "$ref": SCHEMAS + "TraceContext",
        "description": "W3C trace context; always present.",
    }
    header["required"] = [*header.get("required", []), "traceContext"]
    for name, digits in _TRACE_FIELDS.items():
        field = trace["properties"][name]
        field.pop("default", None)
        field.update({"type": "string", "pattern": f"^[0-9a-f]{{{digits}}}$"})
    trace["required"] = list(_TRACE_FIELDS)


class Schemas:
    """Every model's JSON Schema in one pydantic pass, so shared names never collide."""

    def __init__(self, models: Iterable[type[BaseModel]]) -> None:
        unique: list[type[BaseModel]] = list(dict.fromkeys([EnvelopeHeader, ErrorReply, *models]))
        refs, top = models_json_schema(
            [(m, "serialization") for m in unique],
            by_alias=True,
            ref_template=SCHEMAS + "{model}",
            schema_generator=_WireJsonSchema,
        )
        defs: dict[str, Any] = top.get("$defs", {})
        # AsyncAPI component keys allow letters, digits, '.', '-', '_' only
        # (pydantic may name a generic model "Page[int]").
        renames = {name: _COMPONENT_KEY.sub("_", name) for name in defs}
        self.components = {renames[n]: _rewrite_refs(s, renames) for n, s in defs.items()}
        _require_trace_context(self.components)
        self._refs = {
            model: _rewrite_refs(refs[(model, "serialization")], renames) for model in unique
        }

    def ref(self, model: type[BaseModel]) -> dict[str, Any]:
        return dict(self._refs[model])
