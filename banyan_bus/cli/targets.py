"""The user's service: import a target, build its bus, find its contracts, connect.

A *target* is ``module:attribute``: the attribute is a ``MessageBus``, or
``module:factory()`` names a callable (sync or async) that returns one. The
current directory is importable, as with ``python -m``.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from banyan_bus.cli.errors import EXIT_FAILURE, CliError, one_line
from banyan_bus.cli.output import err, markup
from banyan_bus.contracts import Event
from banyan_bus.errors import BanyanError
from banyan_bus.transport.url import mask_url

if TYPE_CHECKING:
    from banyan_bus.bus import MessageBus
    from banyan_bus.contracts import ContractRegistry
    from banyan_bus.transport.base import Transport

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """An imported target: ``obj`` is the bus, or the factory when ``call``."""

    spec: str
    obj: object
    call: bool


def locate(spec: str) -> Target:
    """Import ``module`` of ``module:attr`` (or ``module:factory()``) and find the attribute."""
    module_name, sep, attr = spec.partition(":")
    call = attr.endswith("()")
    attr = attr[:-2] if call else attr
    if not sep or not module_name or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise CliError(
            f"target {spec!r} is not module:attribute; e.g. examples.signup.email_service:bus "
            f"or myservice.app:create_bus()"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:  # like `python -m`: the current directory's packages import
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise CliError(
                f"cannot import {module_name!r}: no module named {exc.name!r} (run banyan "
                f"from the directory that contains it, or install it)"
            ) from exc
        raise CliError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}", EXIT_FAILURE
        ) from exc
    except Exception as exc:
        raise CliError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {one_line(str(exc))}",
            EXIT_FAILURE,
        ) from exc
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"module {module_name!r} has no attribute {attr!r} (target {spec!r})")
        obj = getattr(obj, part)
    if call and not callable(obj):
        raise CliError(f"{spec!r}: {attr} is not callable")
    return Target(spec, obj, call)


async def resolve(target: Target) -> MessageBus:
    """The target's bus, calling (and awaiting) a factory."""
    obj = target.obj
    if target.call and callable(obj):
        obj = obj()
        if inspect.isawaitable(obj):
            obj = await obj
    return _check_bus(target.spec, obj, called=target.call)


def load_bus(spec: str, url: str | None = None) -> MessageBus:
    """The bus of ``spec`` for the commands that do not run it.

    An async factory gets a short event loop of its own; it should build the
    bus, not start it (the commands start what they need). ``url`` (``--url``)
    replaces the bus's URL, in the bus's stage.
    """
    if url is not None:
        check_url(url, "--url")
        os.environ["BANYAN_URL"] = url  # a bus built at import time reads it
    target = locate(spec)
    if target.call and inspect.iscoroutinefunction(target.obj):
        bus = asyncio.run(resolve(target))
    else:
        obj = target.obj() if target.call and callable(target.obj) else target.obj
        bus = _check_bus(spec, obj, called=target.call)
    if url is not None:
        from banyan_bus.stage import scoped_url

        bus.url = scoped_url(url, bus.stage)
    return bus


_SCHEMES = ("amqp", "amqps", "memory")
_LOOSE_USERINFO = re.compile(r"([^:/@,\s]+):[^@/,\s]*@")


def _shown(url: str) -> str:
    """``url`` masked even when it is too broken for :func:`mask_url` to find its password."""
    masked = mask_url(url)
    return masked if masked != url else _LOOSE_USERINFO.sub(r"\1:***@", url)


def url_origin(bus: MessageBus, url: str | None = None) -> str:
    """Where the URL a command uses came from, for an error that says what to change."""
    from banyan_bus.stage import scoped_url

    if url is not None:
        return "--url"
    env = os.environ.get("BANYAN_URL")
    if env:
        try:
            from_env = bus.url in (env, scoped_url(env, bus.stage))
        except BanyanError:
            from_env = False
        if from_env:
            return "BANYAN_URL"
    return f"the bus of service {bus.service!r}"


def check_url(url: str, origin: str) -> None:
    """Refuse a malformed broker URL with exit 2, quoting it (masked) and where it came from."""
    for part in url.split(","):
        scheme, sep, _ = part.partition("://")
        problem = None
        if not sep:
            problem = "no '://' after the scheme"
        elif scheme.lower() not in _SCHEMES:
            problem = f"unknown scheme {scheme!r}"
        elif scheme.lower() != "memory":
            try:
                parts = urlsplit(part)
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError as exc:
                problem = str(exc)
            else:
                if not parts.hostname:
                    problem = "no host"
        if problem is not None:
            raise CliError(
                f"malformed broker URL {_shown(url)!r} (from {origin}): {problem}; expected "
                f"amqp://user:password@host:5672/vhost, amqps://..., or memory://"
            )


def broker_url(bus: MessageBus, command: str, url: str | None = None) -> str:
    """The URL ``banyan COMMAND`` talks to: checked, and never the in-process broker.

    ``publish`` and ``dlq`` on ``memory://`` would publish into (or read) a broker
    that lives only as long as the command: refuse, saying how to name a real one.
    """
    check_url(bus.url, url_origin(bus, url))
    if bus.url.startswith("memory:"):
        raise CliError(
            f"banyan {command} needs RabbitMQ, but {bus.service}'s bus is on memory:// "
            f"(in-process, gone when this command exits): set BANYAN_URL or pass --url"
        )
    return bus.url


def announce(bus: MessageBus, origin: str | None = None) -> None:
    """``banyan run``'s first line on stderr: which broker this service uses (masked).

    On ``memory://`` it says so loudly: no other process sees that broker's events.
    """
    from banyan_bus.cli.supervisor import ENV_WORKER

    check_url(bus.url, origin or url_origin(bus))
    if os.environ.get(ENV_WORKER, "0") != "0":
        return  # with --workers, worker 0 says it for all
    stage = f" (stage {bus.stage})" if bus.stage else ""
    if bus.url.startswith("memory:"):
        err.print(
            f"banyan: warning: {markup(bus.service)} runs on {markup(bus.display_url)}, an "
            f"in-process broker no other process can reach: set BANYAN_URL to use RabbitMQ",
            soft_wrap=True,
        )
    else:
        err.print(
            f"banyan: {markup(bus.service)} uses {markup(bus.display_url)}{stage}", soft_wrap=True
        )


def _check_bus(spec: str, obj: object, *, called: bool) -> MessageBus:
    from banyan_bus.bus import MessageBus

    if not isinstance(obj, MessageBus):
        hint = " (add () to call a factory)" if callable(obj) and not called else ""
        raise CliError(f"{spec!r} is a {type(obj).__name__}, not a MessageBus{hint}")
    return obj


def find_contract(
    registry: ContractRegistry, message_type: str, version: int | None
) -> type[Event]:
    """The event contract ``message_type`` (``version``, else the latest) of the service."""
    versions = registry.versions(message_type)
    if not versions:
        known = sorted({c.__message_type__ for c in registry if c.__message_kind__ == "event"})
        close = difflib.get_close_matches(message_type, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CliError(
            f"unknown message type {message_type!r}{hint} Known event types: "
            f"{', '.join(known) or 'none (does the target import its contracts?)'}"
        )
    if version is None:
        contract = versions[max(versions)]
    elif version in versions:
        contract = versions[version]
    else:
        raise CliError(
            f"{message_type} has no version {version}; registered versions: "
            f"{', '.join(str(v) for v in versions)}"
        )
    if not issubclass(contract, Event):
        raise CliError(
            f"{message_type} is a {contract.__message_kind__}; banyan publish sends events "
            f"(commands and queries go to their owner with bus.send() / bus.query())"
        )
    return contract


async def connect(bus: MessageBus, purpose: str) -> Transport:
    """A connection of the command's own to ``bus``'s broker (named after ``purpose``)."""
    from banyan_bus.transport.factory import make_transport

    check_url(bus.url, url_origin(bus))
    transport = make_transport(bus.url, name=f"{bus.service}-{purpose}")
    await transport.connect()
    return transport


def _loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop when installed (``pip install banyan-bus[speed]``): ~10% more throughput."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None, "asyncio"
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory, "uvloop"


def run_async(main: Callable[[str], Coroutine[Any, Any, T]]) -> T:
    """Run ``main(loop_name)`` on a fresh event loop (uvloop when installed)."""
    factory, name = _loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main(name))
