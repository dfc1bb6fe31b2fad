"""A throwaway RabbitMQ broker in Docker, for machines without a local RabbitMQ.

Fallback only: ``scripts/test.sh`` uses it when ``scripts/services.sh`` cannot provide RabbitMQ
on 127.0.0.1:5672 and a Docker engine answers.

    python3 scripts/testcontainers_broker.py -- python3 -m pytest -q
        Start a ``rabbitmq:3.13-management`` container, enable the consistent-hash exchange
        plugin in it, run the command with BANYAN_TEST_AMQP_URL and BANYAN_TEST_MANAGEMENT_URL
        set, stop the container, exit with the command's exit code.

    python3 scripts/testcontainers_broker.py
        Start the container, print ``export BANYAN_TEST_AMQP_URL=...`` and
        ``export BANYAN_TEST_MANAGEMENT_URL=...`` lines on stdout, and keep the broker alive until
        interrupted (Ctrl-C / SIGTERM); paste the lines into the shell that runs the tests.

The broker's published ports must be on this machine (loopback); anything else is refused.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

IMAGE = "rabbitmq:3.13-management"
AMQP_PORT = 5672
MANAGEMENT_PORT = 15672
USER = "guest"
PASSWORD = "guest"  # the image's default user, reachable from outside the container
PLUGINS = ["rabbitmq_consistent_hash_exchange"]
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def log(message: str) -> None:
    print(f"testcontainers_broker: {message}", file=sys.stderr, flush=True)


def _management_get(base: str, path: str) -> Any:
    req = urllib.request.Request(f"{base}{path}")
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode("ascii")
    req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def _wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        else:
            if result:
                return result
        time.sleep(1.0)
    raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what} (last error: {last})")


def start_broker(timeout: float) -> tuple[Any, str, str]:
    """Start the container; return (container, amqp_url, management_url)."""
    try:
        from testcontainers.core.container import DockerContainer
    except ImportError as exc:
        raise SystemExit(
            f"testcontainers is not installed ({exc}); run: python3 -m pip install -e '.[dev]'"
        ) from None

    container = DockerContainer(IMAGE).with_exposed_ports(AMQP_PORT, MANAGEMENT_PORT)
    log(f"starting {IMAGE} (first run pulls the image)")
    try:
        container.start()
    except Exception as exc:
        raise SystemExit(
            f"testcontainers_broker: could not start {IMAGE} with Docker: {exc}"
        ) from None
    try:
        host = container.get_container_host_ip()
        if host not in LOOPBACK:
            raise SystemExit(
                f"Docker publishes the container's ports on {host!r}, not on this machine; "
                "refusing to use a non-local broker"
            )
        if host == "::1":
            host = "[::1]"
        amqp_port = int(container.get_exposed_port(AMQP_PORT))
        mgmt_port = int(container.get_exposed_port(MANAGEMENT_PORT))
        amqp_url = f"amqp://{USER}:{PASSWORD}@{host}:{amqp_port}/"
        mgmt_url = f"http://{host}:{mgmt_port}"

        _wait_for("the management API", lambda: _management_get(mgmt_url, "/api/overview"), timeout)
        log(f"enabling {', '.join(PLUGINS)}")
        result = container.exec(["rabbitmq-plugins", "enable", *PLUGINS])
        if result.exit_code != 0:
            output = result.output.decode("utf-8", "replace")
            raise RuntimeError(f"rabbitmq-plugins enable failed: {output}")

        def consistent_hash_ready() -> bool:
            overview = _management_get(mgmt_url, "/api/overview")
            types = {t.get("name") for t in overview.get("exchange_types", [])}
            return "x-consistent-hash" in types

        _wait_for("the x-consistent-hash exchange type", consistent_hash_ready, timeout)
        # The management API can answer before the AMQP listener is up.
        _wait_for(
            "the AMQP listener",
            lambda: _management_get(mgmt_url, f"/api/health/checks/port-listener/{AMQP_PORT}"),
            timeout,
        )
    except BaseException:
        container.stop()
        raise
    return container, amqp_url, mgmt_url


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1 :]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for it")
    args = parser.parse_args(own)

    # Turn SIGTERM into an exception so the container is always stopped.
    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)

    container, amqp_url, mgmt_url = start_broker(args.timeout)
    try:
        exports = {"BANYAN_TEST_AMQP_URL": amqp_url, "BANYAN_TEST_MANAGEMENT_URL": mgmt_url}
        if command:
            log(f"broker at {mgmt_url}; running: {shlex.join(command)}")
            env = {**os.environ, **exports}
            return subprocess.call(command, env=env)
        for name, value in exports.items():
            print(f"export {name}={shlex.quote(value)}", flush=True)
        log("broker is up; Ctrl-C or SIGTERM stops it")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 130
    finally:
        log("stopping the container")
        container.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
