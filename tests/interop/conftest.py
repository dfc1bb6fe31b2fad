"""Fixtures for the interop tests: Node.js, with amqplib and @asyncapi/parser npm-installed.

* ``node_modules`` -- installs :data:`NPM_PACKAGES` once per session with
  ``npm install --no-save --prefix tests/interop/.node`` (git-ignored; set
  ``BANYAN_INTEROP_NODE_DIR`` to use another folder) and returns its ``node_modules``
  folder, for ``NODE_PATH``. If ``node`` or ``npm`` is missing or the install fails, every
  test using it FAILS, saying why: an interop test that is skipped proves nothing.
* ``run_node`` -- ``run_node(script, *args, env=..., timeout=...)``: run a script of this
  folder with that ``NODE_PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.node import HERE, node_env

#: What the Node side needs; majors pinned, so a new major cannot change the test silently.
NPM_PACKAGES = ["amqplib@^2", "@asyncapi/parser@^3"]
_INSTALL_HINT = (
    "Install Node.js 18+ and npm (`apt-get install -y nodejs npm`; scripts/test.sh does it "
    "when they are missing)."
)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is not on PATH; the interop tests need it. {_INSTALL_HINT}")
    prefix = Path(os.environ.get("BANYAN_INTEROP_NODE_DIR") or HERE / ".node")
    prefix.mkdir(parents=True, exist_ok=True)
    command = [
        "npm",
        "install",
        "--no-save",
        "--no-audit",
        "--no-fund",
        "--prefer-offline",
        "--prefix",
        str(prefix),
        *NPM_PACKAGES,
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=300, check=False, cwd=prefix
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{' '.join(command)}` did not finish in 300 s: {exc.stderr!r}")
    if result.returncode != 0:
        pytest.fail(
            f"`{' '.join(command)}` failed (exit {result.returncode}); the interop tests "
            f"cannot run without these packages.\nstdout:\n{result.stdout[-3000:]}\n"
            f"stderr:\n{result.stderr[-3000:]}"
        )
    modules = prefix / "node_modules"
    for package in ("amqplib", "@asyncapi/parser"):
        if not (modules / package / "package.json").is_file():
            pytest.fail(f"npm install succeeded but {modules / package} is missing")
    return modules


@pytest.fixture
def run_node(node_modules: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(
        script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["node", str(HERE / script), *args],
            env=node_env(node_modules, env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
