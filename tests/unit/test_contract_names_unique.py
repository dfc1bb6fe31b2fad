"""Every (message type, version) that a test, example or benchmark module defines is
defined in one module only: the registry refuses a second definition, which would
stop the whole test session at collection (and only when both modules are collected)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_contract_names_are_unique_across_modules() -> None:
    where: dict[tuple[str, object], set[str]] = defaultdict(set)
    for folder in ("tests", "examples", "contracts", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ClassDef):
                    continue
                bases = {getattr(b, "id", getattr(b, "attr", None)) for b in node.bases}
                if not bases & {"Event", "Command", "Query"}:
                    continue
                name: object = node.name
                version: object = 1
                for kw in node.keywords:
                    if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                        name = kw.value.value
                    if kw.arg == "version" and isinstance(kw.value, ast.Constant):
                        version = kw.value.value
                where[(str(name), version)].add(str(path.relative_to(ROOT)))
    clashes = {key: sorted(paths) for key, paths in where.items() if len(paths) > 1}
    assert clashes == {}
