"""The compatibility gate: a snapshot of a service's contracts, and what changed since.

Teams deploy publishers and subscribers independently, so a contract version,
once released, is a promise: a subscriber built against ``UserCreated`` v1
must read every v1 event any publisher will ever send. ``snapshot`` records
the JSON Schema (wire names, camelCase) of every contract a service imports in
a file kept under version control; ``compare`` holds the current contracts to
it, for CI::

    banyan contracts snapshot myservice.app:bus     # after a release: commit the file
    banyan contracts check myservice.app:bus        # in CI: exit 1 on a breaking change

Breaking, for an existing (type, version): a removed field, a retyped field
(its schema changed: another type, format, enum, nullability), a newly required
field, a removed version, a type that is gone (renamed or deleted). Allowed: a
new optional field, a new version, a new type. A change that is not additive
belongs in a new version (with ``@downcaster`` / ``@upcaster`` between them).

Everything here is pure: schemas in, problems out; only ``read_snapshot`` and
``write_snapshot`` touch a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banyan_bus.contracts import Message
from banyan_bus.errors import ContractError

__all__ = [
    "DEFAULT_SNAPSHOT",
    "FORMAT",
    "Report",
    "compare",
    "read_snapshot",
    "snapshot",
    "write_snapshot",
]

#: The file ``banyan contracts snapshot`` writes and ``check`` reads by default.
DEFAULT_SNAPSHOT = "contracts.snapshot.json"
#: Written into every snapshot, so that a later format can still read this one.
FORMAT = "banyan-contracts/1"

Snapshot = dict[str, Any]
_Key = tuple[str, int]
# Keywords that document a schema without changing what it accepts.
_DOCUMENTATION = frozenset({"title", "description", "default", "examples", "deprecated"})
_MAX_DEPTH = 32  # nested $refs are inlined to compare them; a recursive model stops here


@dataclass(frozen=True, slots=True)
class Report:
    """What changed between a snapshot and the current contracts.

    ``problems`` are breaking changes, one line each (``UserCreated v1: removed
    field 'email'``); ``additions`` are the allowed ones.
    """

    problems: list[str] = field(default_factory=list)
    additions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def snapshot(contracts: Iterable[type[Message]]) -> Snapshot:
    """The snapshot of ``contracts``: type, version, kind and JSON Schema of each."""
    entries = []
    for contract in sorted(contracts, key=lambda c: (c.__message_type__, c.__message_version__)):
        try:
            schema = contract.model_json_schema(by_alias=True)
        except Exception as exc:  # a field type pydantic cannot describe
            raise ContractError(
                f"{contract.__name__} has no JSON Schema, so it cannot be snapshotted: {exc}"
            ) from exc
        entries.append(
            {
                "type": contract.__message_type__,
                "version": contract.__message_version__,
                "kind": contract.__message_kind__,
                "schema": schema,
            }
        )
    return {"format": FORMAT, "contracts": entries}


def write_snapshot(path: str | Path, contracts: Iterable[type[Message]]) -> Snapshot:
    """Write the snapshot of ``contracts`` to ``path`` (sorted keys: a stable diff)."""
    data = snapshot(contracts)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return data


def read_snapshot(path: str | Path) -> Snapshot:
    """Read a snapshot file; ``ValueError`` says what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a banyan contracts snapshot (format {FORMAT!r})")
    _entries(data, str(path))  # validates its shape
    return data


def _entries(data: Mapping[str, Any], where: str = "snapshot") -> dict[_Key, dict[str, Any]]:
    entries = data.get("contracts")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'contracts' must be a list")
    by_key: dict[_Key, dict[str, Any]] = {}
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("type"), str)
            and isinstance(entry.get("version"), int)
            and isinstance(entry.get("schema"), dict)
        ):
            raise ValueError(f"{where}: every contract needs 'type', 'version' and 'schema'")
        by_key[(entry["type"], entry["version"])] = entry
    return by_key


def compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> Report:
    """What changed from snapshot ``before`` to snapshot ``after``."""
    old, new = _entries(before), _entries(after)
    report = Report()
    new_types = {t for t, _ in new}
    old_types = {t for t, _ in old}
    for key in sorted(old):
        message_type, version = key
        name = f"{message_type} v{version}"
        if message_type not in new_types:
            if version == min(v for t, v in old if t == message_type):  # once per type
                report.problems.append(
                    f"{message_type}: the type is gone (renamed or removed); subscribers "
                    f"and publishers of it would stop matching. Keep the old name "
                    f"(`name={message_type!r}`) or add a new type next to it."
                )
            continue
        if key not in new:
            report.problems.append(f"{name}: the version is gone")
            continue
        if old[key].get("kind") != new[key].get("kind"):
            report.problems.append(
                f"{name}: was a {old[key].get('kind')}, is now a {new[key].get('kind')}"
            )
        _compare_object(
            name,
            "",
            _Schema(old[key]["schema"]),
            _Schema(new[key]["schema"]),
            old[key]["schema"],
            new[key]["schema"],
            report,
        )
    for key in sorted(new.keys() - old.keys()):
        message_type, version = key
        if message_type not in old_types:
            if version == min(v for t, v in new if t == message_type):
                versions = sorted(v for t, v in new if t == message_type)
                shown = ", ".join(f"v{v}" for v in versions)
                report.additions.append(f"new type {message_type} ({shown})")
        else:
            report.additions.append(f"new version {message_type} v{version}")
    return report


class _Schema:
    """One contract's JSON Schema, able to follow its ``$ref``s into ``$defs``."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        defs = root.get("$defs")
        self._defs: Mapping[str, Any] = defs if isinstance(defs, Mapping) else {}

    def resolve(self, node: Any) -> Any:
        seen = 0
        while isinstance(node, Mapping) and isinstance(node.get("$ref"), str) and seen < 8:
            target = self._defs.get(node["$ref"].rsplit("/", 1)[-1])
            if not isinstance(target, Mapping):
                return node
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            seen += 1
        return node

    def canonical(self, node: Any, depth: int = 0) -> Any:
        """``node`` with its refs inlined and its documentation dropped: what it accepts."""
        if depth > _MAX_DEPTH:
            return "…"
        node = self.resolve(node)
        if isinstance(node, Mapping):
            return {
                k: self.canonical(v, depth + 1)
                for k, v in sorted(node.items())
                if k not in _DOCUMENTATION
            }
        if isinstance(node, list):
            return [self.canonical(v, depth + 1) for v in node]
        return node


def _compare_object(
    name: str,
    path: str,
    old_schema: _Schema,
    new_schema: _Schema,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    report: Report,
    depth: int = 0,
) -> None:
    """Field by field; nested models are walked so a problem names the full path."""
    old_props: Mapping[str, Any] = old.get("properties") or {}
    new_props: Mapping[str, Any] = new.get("properties") or {}
    old_required = set(old.get("required") or ())
    new_required = set(new.get("required") or ())
    for field_name in sorted(old_props):
        where = f"{path}{field_name}"
        if field_name not in new_props:
            report.problems.append(f"{name}: removed field '{where}'")
            continue
        before = old_schema.resolve(old_props[field_name])
        after = new_schema.resolve(new_props[field_name])
        if depth < _MAX_DEPTH and _is_object(before) and _is_object(after):
            _compare_object(
                name, f"{where}.", old_schema, new_schema, before, after, report, depth + 1
            )
        elif old_schema.canonical(before) != new_schema.canonical(after):
            report.problems.append(
                f"{name}: retyped field '{where}': {_describe(old_schema, before)} → "
                f"{_describe(new_schema, after)}"
            )
    for field_name in sorted(new_required - old_required):
        report.problems.append(f"{name}: newly required field '{path}{field_name}'")
    for field_name in sorted(new_props):
        if field_name not in old_props and field_name not in new_required:
            report.additions.append(f"{name}: new optional field '{path}{field_name}'")


def _is_object(node: Any) -> bool:
    return isinstance(node, Mapping) and isinstance(node.get("properties"), Mapping)


def _describe(schema: _Schema, node: Any, depth: int = 0) -> str:
    """A short human name for what a schema accepts: ``integer``, ``string|null``."""
    node = schema.resolve(node)
    if not isinstance(node, Mapping) or depth > 3:
        return "any"
    for union in ("anyOf", "oneOf"):
        if isinstance(node.get(union), list):
            return "|".join(_describe(schema, n, depth + 1) for n in node[union])
    if "enum" in node:
        return "one of " + ", ".join(json.dumps(v) for v in node["enum"])
    if "const" in node:
        return f"const {json.dumps(node['const'])}"
    kind = node.get("type", "any")
    if isinstance(kind, list):
        kind = "|".join(str(k) for k in kind)
    if kind == "array" and "items" in node:
        return f"array of {_describe(schema, node['items'], depth + 1)}"
    if "format" in node:
        return f"{kind} ({node['format']})"
    return str(kind)
