"""The reliability suite writes to the ignored reports folder; RESULTS.md changes on request."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import harness, results


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    committed = tmp_path / "RESULTS.md"
    committed.write_text(
        results.render({"0-old": "<!-- scenario:0-old -->\nold\n<!-- /scenario:0-old -->"})
    )
    last_run = tmp_path / "reports" / "reliability" / "RESULTS.md"
    monkeypatch.setattr(results, "COMMITTED", committed)
    monkeypatch.setattr(results, "LAST_RUN", last_run)
    monkeypatch.setattr(results, "REPO", tmp_path)
    return committed, last_run


def test_a_run_writes_to_the_reports_folder_only(paths: tuple[Path, Path]) -> None:
    committed, last_run = paths
    before = committed.read_text()
    harness.write_results("1-demo", "1. Demo", {"events": 10})
    assert committed.read_text() == before
    assert "| events | 10 |" in last_run.read_text()


def test_commit_merges_the_last_run_into_results_md(paths: tuple[Path, Path]) -> None:
    committed, _ = paths
    harness.write_results("1-demo", "1. Demo", {"events": 10})
    assert results.main(["--commit"]) == 0
    text = committed.read_text()
    assert "| events | 10 |" in text
    assert "<!-- scenario:0-old -->" in text  # scenarios not in the last run stay


def test_the_reports_folder_is_ignored_by_git() -> None:
    gitignore = Path(__file__).resolve().parents[2] / ".gitignore"
    assert "reports/" in gitignore.read_text().splitlines()
