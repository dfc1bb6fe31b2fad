"""Reliability suite (issue 10): faults injected mid-stream, every event id counted.

Every test here is marked ``reliability``; select it with ``pytest -m reliability`` or leave
it out with ``-m "not reliability"``. Figures go to ``reports/reliability/RESULTS.md``
(git-ignored); ``python -m tests.reliability.results --commit`` copies them into the
committed ``tests/reliability/RESULTS.md``.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability: fault-injection suite (slow)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.reliability)
