"""A missing database driver fails with the pip command that installs it (no I/O)."""

from __future__ import annotations

import sys

import pytest

from banyan_bus.eventstore import (
    ANY,
    NO_STREAM,
    ConcurrencyError,
    PostgresEventStore,
    SqliteEventStore,
)


def test_missing_aiosqlite_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiosqlite", None)  # makes `import aiosqlite` fail
    with pytest.raises(ImportError, match=r'pip install "banyan-bus\[sqlite\]"'):
        SqliteEventStore("events.db")


def test_missing_asyncpg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ImportError, match=r'pip install "banyan-bus\[postgres\]"'):
        PostgresEventStore("postgresql://localhost/db")


def test_schema_name_is_checked() -> None:
    with pytest.raises(ValueError, match="schema"):
        PostgresEventStore("postgresql://localhost/db", schema='x"; DROP TABLE y; --')


def test_concurrency_error_says_what_happened_and_what_to_do() -> None:
    err = ConcurrencyError("order-1", NO_STREAM, 3)
    assert (err.stream, err.expected, err.actual) == ("order-1", NO_STREAM, 3)
    assert "version 3" in str(err)
    assert "NO_STREAM" in str(err)
    assert "reload" in str(err)
    assert repr(ANY) == "ANY"
