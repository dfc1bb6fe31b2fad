"""What exists on the broker: RabbitMQ's management HTTP API, read-only, for ``topology --prune``.

AMQP can only ask about a queue or exchange by name (a passive declare); it
cannot list what a vhost holds. The management plugin's HTTP API can, so
``banyan topology --prune`` uses it to find what a service declared once and
no longer does. Standard library only (``urllib``): the CLI adds no dependency
for one GET per kind.

The API's root is ``--management-url`` or ``BANYAN_MANAGEMENT_URL``, else the
broker's host on port 15672 (``amqps://``: https on 15671), with the AMQP URL's
user and password (RabbitMQ's management users are its AMQP users).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from banyan_bus.cli.errors import EXIT_FAILURE, CliError

MANAGEMENT_URL_ENV = "BANYAN_MANAGEMENT_URL"
TIMEOUT = 15.0


@dataclass(frozen=True)
class Management:
    """The management API of one broker, for the vhost of one AMQP URL."""

    root: str
    vhost: str
    user: str
    password: str

    @classmethod
    def for_url(cls, amqp_url: str, root: str | None = None) -> Management:
        """For the first node of ``amqp_url``; ``root`` (or the environment) overrides where."""
        parts = urlsplit(amqp_url.split(",")[0])
        vhost = unquote(parts.path[1:]) if parts.path not in ("", "/") else "/"
        if root is None:
            root = os.environ.get(MANAGEMENT_URL_ENV)
        if root is None:
            secure = parts.scheme == "amqps"
            host = parts.hostname or "localhost"
            host = f"[{host}]" if ":" in host else host
            root = f"{'https' if secure else 'http'}://{host}:{15671 if secure else 15672}"
        return cls(
            root.rstrip("/"),
            vhost,
            unquote(parts.username or "guest"),
            unquote(parts.password or "guest"),
        )

    def _get(self, path: str) -> list[dict[str, Any]]:
        url = f"{self.root}{path}"
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        hint = (
            f"pass --management-url or set {MANAGEMENT_URL_ENV} (the management plugin is needed)"
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                data = json.load(response)
        except urllib.error.HTTPError as exc:
            raise CliError(
                f"RabbitMQ management API at {self.root} answered {exc.code} {exc.reason} "
                f"for GET {path}; {hint}",
                EXIT_FAILURE,
            ) from exc
        except (OSError, ValueError) as exc:
            raise CliError(
                f"cannot reach the RabbitMQ management API at {self.root} ({exc}); {hint}",
                EXIT_FAILURE,
            ) from exc
        if not isinstance(data, list):
            raise CliError(f"unexpected answer from {url}: not a list", EXIT_FAILURE)
        return data

    def queues(self) -> list[str]:
        """Names of the vhost's queues."""
        columns = "?columns=name"
        return [str(q["name"]) for q in self._get(f"/api/queues/{quote(self.vhost, '')}{columns}")]

    def exchanges(self) -> list[str]:
        """Names of the vhost's exchanges (the default and ``amq.*`` ones left out)."""
        found = self._get(f"/api/exchanges/{quote(self.vhost, '')}?columns=name")
        names = [str(e["name"]) for e in found]
        return [n for n in names if n and not n.startswith("amq.")]
