"""The AsyncAPI document of every example service passes the official AsyncAPI parser.

``@asyncapi/parser`` (npm-installed by the ``node_modules`` fixture) runs through
``validate_asyncapi.js``; a diagnostic of severity error or warning fails the test (info
and hint are printed). The documents come from ``banyan asyncapi module:bus`` for every
example module with a ``bus``; the two example services that build their bus in a factory
(``OrderStoreService``, the FastAPI app's ``create_app``) are documented in-process with the
same function the command calls. A broken document must be refused, so the check is not
vacuous.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import examples.fastapi_signup.app as fastapi_example
from banyan_bus import MessageBus
from banyan_bus.asyncapi import asyncapi_document
from banyan_bus.eventstore import SqliteEventStore
from examples.orders.order_store_service import OrderStoreService

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
#: Modules that build a MessageBus but are not one service: they start the example's
#: services together, with a client bus of their own.
NOT_SERVICES = {"examples.signup.all_in_one", "examples.orders.all_in_one"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _bus_modules() -> tuple[list[str], list[str]]:
    """(modules with a module-level ``bus``, other modules that build a MessageBus)."""
    with_bus, others = [], []
    for path in sorted(EXAMPLES.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "MessageBus(" not in source or _module_name(path) in NOT_SERVICES:
            continue
        if re.search(r"^bus\s*[:=]", source, re.MULTILINE):
            with_bus.append(_module_name(path))
        else:
            others.append(_module_name(path))
    return with_bus, others


def _order_store_bus(tmp_path: Path) -> MessageBus:
    return OrderStoreService(None, SqliteEventStore(str(tmp_path / "orders.db"))).bus


def _fastapi_bus(tmp_path: Path) -> MessageBus:
    module = fastapi_example
    built: list[MessageBus] = []

    class Recording(MessageBus):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    original = module.MessageBus
    module.MessageBus = Recording  # type: ignore[misc]
    try:
        module.create_app("memory://")
    finally:
        module.MessageBus = original  # type: ignore[misc]
    assert len(built) == 1
    return built[0]


#: Example services whose bus a factory builds: how to get that bus.
FACTORIES: dict[str, Callable[[Path], MessageBus]] = {
    "examples.orders.order_store_service": _order_store_bus,
    "examples.fastapi_signup.app": _fastapi_bus,
}


def _validate(run_node: Callable[..., subprocess.CompletedProcess[str]], files: list[Path]):
    result = run_node("validate_asyncapi.js", *map(str, files), timeout=120)
    assert result.returncode in (0, 1), (
        f"validate_asyncapi.js exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    reports = {Path(r["file"]): r for r in map(json.loads, result.stdout.splitlines())}
    assert set(reports) == set(files), result.stdout
    return result.returncode, reports


def test_every_example_service_passes_the_official_asyncapi_parser(
    run_node: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    with_bus, others = _bus_modules()
    assert len(with_bus) >= 7, with_bus  # the signup and orders services
    assert set(others) == set(FACTORIES), (
        f"example services without a module-level bus and no factory here: "
        f"{sorted(set(others) - set(FACTORIES))}"
    )
    files: list[Path] = []
    for module in with_bus:
        target = tmp_path / f"{module}.json"
        result = subprocess.run(
            [sys.executable, "-m", "banyan_bus.cli", "asyncapi", f"{module}:bus", "-o", target],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"banyan asyncapi {module}:bus\n{result.stderr}"
        files.append(target)
    for module, factory in FACTORIES.items():
        target = tmp_path / f"{module}.json"
        target.write_text(json.dumps(asyncapi_document(factory(tmp_path)), indent=2))
        files.append(target)
    # The control: a document the parser must refuse.
    broken = json.loads(files[0].read_text(encoding="utf-8"))
    first_channel = next(iter(broken["channels"].values()))
    first_channel["messages"]["Nope"] = {"$ref": "#/components/messages/Nope"}
    broken["components"]["schemas"]["EnvelopeHeader"]["type"] = "objekt"
    broken_file = tmp_path / "broken.json"
    broken_file.write_text(json.dumps(broken))

    code, reports = _validate(run_node, [*files, broken_file])
    assert code == 1
    control = reports.pop(broken_file)
    assert not control["ok"]
    assert {d["code"] for d in control["diagnostics"] if d["severity"] == "error"} >= {
        "invalid-ref"
    }, control

    failures = {
        file.name: [d for d in report["diagnostics"] if d["severity"] in ("error", "warning")]
        for file, report in reports.items()
        if not report["ok"]
    }
    assert not failures, json.dumps(failures, indent=2)
    assert all(report["parsed"] for report in reports.values())
    for file, report in reports.items():
        for d in report["diagnostics"]:  # info / hint only, shown with -s or on failure
            print(f"{file.name}: {d['severity']} {d['code']} {d['path']}: {d['message']}")

    # What the platform's generated types rely on.
    for file in files:
        document = json.loads(file.read_text(encoding="utf-8"))
        schemas = document["components"]["schemas"]
        header, trace = schemas["EnvelopeHeader"], schemas["TraceContext"]
        assert "traceContext" in header["required"], file.name
        assert header["properties"]["traceContext"]["$ref"].endswith("/TraceContext")
        assert trace["required"] == ["traceId", "spanId", "traceFlags"]
        assert all(trace["properties"][k]["type"] == "string" for k in trace["required"])
    payments = json.loads((tmp_path / "examples.orders.payment_service.json").read_text())
    assert payments["components"]["schemas"]["PaymentProcessed"]["properties"]["amount"] == {
        "title": "Amount",
        "type": "number",
    }


@pytest.mark.parametrize("bad", ["warning", "error"])
def test_the_validator_fails_on_warnings_too(
    run_node: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, bad: str
) -> None:
    document: dict[str, Any]
    if bad == "warning":
        # The parser's recommended rules warn about a 2.x document without id, servers,
        # contact, license, description, defaultContentType and tags.
        document = {"asyncapi": "2.6.0", "info": {"title": "t", "version": "1"}, "channels": {}}
    else:
        document = {
            "asyncapi": "3.0.0",
            "info": {"title": "t", "version": "1"},
            "channels": {"c": {"messages": {"m": {"$ref": "#/components/messages/m"}}}},
        }
    file = tmp_path / f"{bad}.json"
    file.write_text(json.dumps(document))
    code, reports = _validate(run_node, [file])
    severities = {d["severity"] for d in reports[file]["diagnostics"]}
    assert bad in severities, reports[file]
    assert code == 1
    assert not reports[file]["ok"]
