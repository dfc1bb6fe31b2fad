"""Where the interop tests' Node side lives, and the environment it runs in."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def node_env(node_modules: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with ``NODE_PATH`` at the npm-installed packages."""
    env = dict(os.environ, NODE_PATH=str(node_modules), NO_UPDATE_NOTIFIER="1")
    env.update(extra or {})
    return env
