"""How values look on the wire, the same for the envelope and for every payload.

The platform's other services (TypeScript ones first) read what we write, so two
JSON forms follow the platform, not pydantic's defaults:

- **Datetimes** are ISO-8601 in UTC with milliseconds and ``Z``
  (``2025-11-15T10:30:00.123Z``), like the envelope's ``timestamp``; pydantic
  writes microseconds and ``+00:00``, which ``Date.parse`` accepts but generated
  types and string comparisons do not expect. A naive datetime is taken as UTC.
- **Decimals** are JSON numbers with their exact digits (``99.99``, never
  ``"99.99"`` and never a float's ``99.98999…``): pydantic writes a string. A
  JavaScript reader gets a ``number``; a reader that needs exact money parses the
  raw text (every JSON library that supports big decimals can). Non-finite
  decimals have no JSON number and stay strings.

pydantic can only make a decimal a string or a float, so the contract's JSON
encoder writes a marked string and :func:`unmark_decimals` turns the marked
strings into bare numbers in the encoded bytes. The mark begins with U+0000,
which JSON always escapes, so it cannot be confused with text a user wrote
unless that text starts with the whole mark; the check costs one ``in`` on
bodies without decimals.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

_MARK = "\x00banyan-decimal:"
_MARKED = re.compile(rb'"\\u0000banyan-decimal:([-+0-9.eE]+)"')
_MARKED_PROBE = b"\\u0000banyan-decimal:"
_MARKED_TEXT = re.compile(r'"\\u0000banyan-decimal:([-+0-9.eE]+)"')


def format_timestamp(ts: datetime) -> str:
    """``2025-11-15T10:30:00.123Z``: milliseconds, UTC, ``Z``."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    elif ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    return ts.isoformat(timespec="milliseconds")[:23] + "Z"


def mark_decimal(value: Decimal) -> str:
    """A decimal as pydantic's JSON encoder should write it, before :func:`unmark_decimals`."""
    if not value.is_finite():
        return str(value)
    return _MARK + str(value)


def unmark_decimals(body: bytes) -> bytes:
    """Turn the marked decimal strings of an encoded payload into JSON numbers."""
    if _MARKED_PROBE not in body:
        return body
    return _MARKED.sub(rb"\1", body)


def unmark_decimals_text(text: str) -> str:
    """:func:`unmark_decimals` for JSON text (``model_dump_json``)."""
    if "banyan-decimal:" not in text:
        return text
    return _MARKED_TEXT.sub(r"\1", text)


def unmark_tree(value: Any) -> Any:
    """A ``model_dump(mode="json")`` result with marked decimals back to plain strings.

    A Python dict cannot hold a bare JSON number token, so here a decimal keeps
    pydantic's own JSON-mode form, its string.
    """
    if isinstance(value, str):
        return value[len(_MARK) :] if value.startswith(_MARK) else value
    if isinstance(value, dict):
        return {k: unmark_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unmark_tree(v) for v in value]
    return value
