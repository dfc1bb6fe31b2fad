"""Stages (dev, test, production) on one broker: one RabbitMQ vhost per stage.

A platform often runs several stages on one cluster. Exchanges, queues and
bindings live inside a vhost, so a vhost per stage keeps every stage's events,
retries and dead letters apart with no change to names or code, and
RabbitMQ's per-vhost permissions keep a stage's credentials out of the others.

``MessageBus(..., stage="test")`` (or ``BANYAN_STAGE=test``) points the bus's
URL at the vhost named after the stage::

    MessageBus("billing", "amqp://billing-test:pw@rabbit:5672/", stage="test")
    # connects to amqp://billing-test:pw@rabbit:5672/test

A URL that already names that vhost is left alone (so applying a stage twice
is harmless); one naming *another* vhost is refused: the two settings would
disagree about where the service's events go. On ``memory://`` each stage gets
its own in-process broker.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from banyan_bus.errors import ConfigurationError
from banyan_bus.transport.url import mask_url

__all__ = ["STAGE_ENV", "check_stage", "scoped_url", "stage_vhost"]

#: The environment variable read when ``MessageBus(stage=...)`` is not given.
STAGE_ENV = "BANYAN_STAGE"

_STAGE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_stage(stage: str | None) -> str | None:
    """``stage`` if it is a valid stage name (lowercase letters, digits, ``-``, ``_``)."""
    if stage is None:
        return None
    if not _STAGE.match(stage):
        raise ConfigurationError(
            f"invalid stage {stage!r}: 1-63 of lowercase a-z, 0-9, '-' and '_', starting with "
            f"a letter or digit (it becomes the vhost name), e.g. 'dev', 'test', 'prod'"
        )
    return stage


def stage_vhost(stage: str) -> str:
    """The vhost of ``stage``: the stage's name itself (``dev``, ``test``, ``prod``)."""
    return stage


def scoped_url(url: str, stage: str | None) -> str:
    """``url`` pointed at ``stage``'s vhost (each node of a cluster list); as is without one."""
    if stage is None:
        return url
    return ",".join(_scope_one(part, stage, url) for part in url.split(","))


def _scope_one(url: str, stage: str, whole: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url  # not a URL: the transport factory reports it
    if scheme.lower() == "memory":
        name = rest.strip("/")
        suffix = f"stage-{stage}"
        return url if name.endswith(suffix) else f"memory://{name}/{suffix}"
    authority, slash, tail = rest.partition("/")
    path, qmark, query = tail.partition("?")
    vhost = stage_vhost(stage)
    current = unquote(path) if slash and path else "/"
    if current not in ("/", vhost):
        raise ConfigurationError(
            f"the bus URL {mask_url(whole)!r} names vhost {current!r} but stage {stage!r} "
            f"means vhost {vhost!r}: drop the vhost from the URL, or the stage"
        )
    return f"{scheme}://{authority}/{quote(vhost, safe='')}{qmark}{query}"
